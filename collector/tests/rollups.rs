//! The Postgres rollups (`collector/src/rollup.rs`) against the raw-event queries they stand
//! in for: the same answers over ranges that cut hours and sessions, after duplicates and
//! late events, and for a session extended batch after batch across an hour boundary (its
//! contribution moved between hours, stale entry/exit rows read right); the inbox counted
//! exactly once; the same rollups whether filled by the drain or rebuilt; visitors within
//! HyperLogLog's error on a larger set; and the raw fallback without the tables.
//!
//! Needs the `hll` extension on the test server (Debian `postgresql-15-hll`): without it the
//! first test fails and says so.

#[macro_use]
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;
use tracklet_collector::analytics::{Dimension, Filters, Interval, Query};
use tracklet_collector::rollup;
use tracklet_collector::store::postgres::PgStore;
use tracklet_collector::store::EventStore;

const UAS: [Option<&str>; 4] = [
    None,
    Some("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"),
    Some("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"),
    Some("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
];
const PAGES: [&str; 5] = ["/", "/pricing", "/docs", "/blog/a", "/signup"];
const REFERRERS: [&str; 4] = [
    "",
    "https://www.google.com/search?q=x",
    "https://News.ycombinator.com/item?id=1",
    "https://t.co/abc",
];

/// Session `s` (of visitor `s % 7`): `1 + s % 5` events 13 minutes apart, starting
/// `start_min` minutes before `sent_at`, so sessions cross hour boundaries. Every fourth
/// event is a `signup`. Ids are `base + s * 10 + i`.
fn session(base: u64, s: u64, start_min: u64, sent_at: u64) -> Vec<Value> {
    (0..1 + s % 5)
        .map(|i| {
            let n = base + s * 10 + i;
            let path = PAGES[((s + i) % 5) as usize];
            // Campaign parameters on some landing pages (a third of them none).
            let query = match s % 3 {
                0 => format!("?utm_source=news&utm_medium=email&utm_campaign=c{}", s % 2),
                1 => "?ref=1&utm_source=google#utm_medium=no".to_owned(),
                _ => String::new(),
            };
            let mut context =
                json!({"path": path, "url": format!("https://example.com{path}{query}")});
            if i == 0 {
                context["referrer"] = json!(REFERRERS[(s % 4) as usize]);
            }
            json!({
                "id": format!("0190b6f0-0000-7000-8000-{n:012}"),
                "name": if (s + i) % 4 == 3 { "signup" } else { "page_view" },
                "ts": sent_at - (start_min - i * 13) * 60_000,
                "anonymous_id": format!("v{}", s % 7),
                "session_id": format!("s{s}"),
                "context": context,
            })
        })
        .collect()
}

async fn post_as(app: &TestApp, ua: Option<&str>, sent_at: u64, events: Vec<Value>) -> Value {
    let mut request = Request::post(app.batch_uri())
        .header("content-type", "text/plain")
        .header("origin", ORIGIN);
    if let Some(ua) = ua {
        request = request.header("user-agent", ua);
    }
    let a = app
        .send(request.body(Body::from(batch(sent_at, events))).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.json
}

/// 24 sessions over the last seven hours, one request per user agent.
async fn load(app: &TestApp, sent_at: u64) {
    for (u, ua) in UAS.iter().enumerate() {
        let events = (0..24u64)
            .filter(|s| s % 4 == u as u64)
            .flat_map(|s| session(0, s, 60 + s * 17, sent_at))
            .collect();
        post_as(app, *ua, sent_at, events).await;
    }
}

async fn pool_of(app: &TestApp) -> PgPool {
    PgPool::connect(&app.db.as_ref().unwrap().url)
        .await
        .expect("connect to the test database")
}

/// Every stats call the rollups answer (and some they do not), over ranges of `now`-relative
/// minutes, asked of both stores: the answers must be the same.
async fn assert_same_answers(rollups: &dyn EventStore, raw: &dyn EventStore, q0: &Query) {
    let now = q0.to;
    let mins = |m: i64| now - Duration::minutes(m);
    let ranges = [
        (mins(600), now),
        (mins(330), mins(65)),
        // Hour-aligned ends.
        (
            DateTime::from_timestamp(mins(300).timestamp() / 3600 * 3600, 0).unwrap(),
            DateTime::from_timestamp(mins(60).timestamp() / 3600 * 3600, 0).unwrap(),
        ),
        // Inside one hour, and cutting sessions on both sides.
        (mins(200), mins(170)),
        (mins(250), mins(100)),
    ];
    let filters = [
        vec![],
        vec![(Dimension::Page, "/pricing".to_owned())],
        vec![(Dimension::Referrer, "(direct)".to_owned())],
        vec![(Dimension::Browser, "Chrome".to_owned())],
        vec![(Dimension::UtmSource, "news".to_owned())],
        vec![
            (Dimension::Event, "page_view".to_owned()),
            (Dimension::Page, "/".to_owned()),
        ],
    ];
    for (from, to) in ranges {
        for f in &filters {
            let q = Query {
                from,
                to,
                filters: Filters(f.clone()),
                ..q0.clone()
            };
            let what = format!("{from}..{to} {f:?}");
            assert_eq!(
                rollups.analytics_summary(&q).await.unwrap(),
                raw.analytics_summary(&q).await.unwrap(),
                "summary {what}"
            );
            for interval in [Interval::Hour, Interval::Day] {
                assert_eq!(
                    rollups.analytics_timeseries(&q, interval).await.unwrap(),
                    raw.analytics_timeseries(&q, interval).await.unwrap(),
                    "timeseries {interval:?} {what}"
                );
            }
            for by in [
                Dimension::Page,
                Dimension::Referrer,
                Dimension::Browser,
                Dimension::Os,
                Dimension::Device,
                Dimension::Country,
                Dimension::Event,
                Dimension::UtmSource,
                Dimension::UtmMedium,
                Dimension::UtmCampaign,
                Dimension::EntryPage,
                Dimension::ExitPage,
                Dimension::Prop("x".to_owned()),
            ] {
                assert_eq!(
                    rollups.analytics_breakdown(&q, &by, 100).await.unwrap(),
                    raw.analytics_breakdown(&q, &by, 100).await.unwrap(),
                    "breakdown {by:?} {what}"
                );
            }
        }
    }
}

/// The rollups as comparable rows (HyperLogLogs as their cardinality), once the inbox is
/// drained (which also recomputes stale entry/exit rows). Hour rows left without sessions
/// and the longest-session bounds (only ever raised) are left out: a rebuild has neither.
async fn snapshot(pool: &PgPool) -> Vec<(String, i64, i64, f64)> {
    rollup::drain(pool, i64::MAX).await.unwrap();
    let mut rows: Vec<(String, i64, i64, f64)> = sqlx::query_as(
        "SELECT dim || ' ' || hour || ' ' || key, events, pageviews, \
             hll_cardinality(visitors) FROM rollup_hourly \
         UNION ALL SELECT concat_ws(' ', session_id, first_time, last_time, entry_time, \
             entry_id, entry_page, entry_visitor, exit_time, exit_id, exit_page, exit_visitor), \
             events, pageviews, 0 FROM rollup_sessions \
         UNION ALL SELECT 'hour ' || hour, sessions, bounces, micros::float8 \
             FROM rollup_session_hours WHERE sessions <> 0 \
         UNION ALL SELECT concat_ws(' ', 'end', kind, hour, page, stale), sessions, 0, \
             hll_cardinality(visitors) FROM rollup_session_ends WHERE sessions <> 0",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[tokio::test]
async fn rollups_answer_like_raw_events_after_duplicates_and_late_events() {
    let app = app(Backend::Postgres).await;
    let pool = pool_of(&app).await;
    let installed: bool = sqlx::query_scalar(
        "SELECT to_regclass('rollup_hourly') IS NOT NULL \
             AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hll')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        installed,
        "the hll extension is required for the rollups: apt-get install postgresql-15-hll"
    );
    let raw = PgStore::without_rollups(pool.clone());
    let sent_at = Utc::now().timestamp_millis() as u64;
    load(&app, sent_at).await;
    let q = Query {
        project_id: app.project.id,
        from: Utc::now() - Duration::hours(10),
        to: DateTime::from_timestamp_millis(sent_at as i64).unwrap(),
        filters: Filters::default(),
    };
    // The commits only filled the inbox; a drain counts it, once.
    let (events, waiting): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events WHERE NOT is_bot), \
             (SELECT count(*) FROM rollup_inbox)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(waiting, events);
    assert_eq!(rollup::drain(&pool, i64::MAX).await.unwrap(), events);
    assert_eq!(rollup::drain(&pool, i64::MAX).await.unwrap(), 0);
    // Not vacuous: the rollups hold every event but the bot's, once.
    let (in_rollups, in_sessions, sessions, waiting): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(events)::int8 FROM rollup_hourly WHERE dim = 0), \
             (SELECT sum(events)::int8 FROM rollup_sessions), \
             (SELECT sum(sessions)::int8 FROM rollup_session_hours), \
             (SELECT count(*) FROM rollup_inbox)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(events > 40, "{events}");
    assert_eq!(
        (in_rollups, in_sessions, sessions, waiting),
        (events, events, 18, 0)
    );
    assert_same_answers(app.store.as_ref(), &raw, &q).await;

    // The same requests again, and one mixing old and new events: duplicates count once.
    let before = snapshot(&pool).await;
    load(&app, sent_at).await;
    assert_eq!(
        snapshot(&pool).await,
        before,
        "duplicates changed the rollups"
    );
    let mut mixed = session(0, 5, 60 + 5 * 17, sent_at);
    mixed.extend(session(1000, 30, 45, sent_at));
    let a = post_as(&app, UAS[1], sent_at, mixed).await;
    assert_eq!(a["accepted"], 1, "{a}");
    assert_eq!(a["duplicates"], 1, "{a}");

    // Late and out of order: an earlier event of session s3, sent an hour later (its
    // session now starts sooner), and events of new sessions hours back.
    let later = sent_at + 3_600_000;
    let mut late = vec![json!({
        "id": "0190b6f0-0000-7000-8000-000000009999",
        "name": "page_view",
        "ts": later - 7 * 3_600_000,
        "anonymous_id": "v3",
        "session_id": "s3",
        "context": {"path": "/late"},
    })];
    late.extend(session(2000, 40, 350, sent_at));
    post_as(&app, UAS[2], later, late).await;
    assert_same_answers(app.store.as_ref(), &raw, &q).await;

    // Rebuilt from the stored events (what the benchmark and migration 0004 do): the same
    // rollups as the commit path built.
    let built = snapshot(&pool).await;
    let counted = rollup::rebuild(&pool, Some(app.project.id)).await.unwrap();
    assert!(counted > events, "{counted}");
    assert_eq!(snapshot(&pool).await, built);

    // A migration's request for a rebuild (as 0009's for the UTM dimensions, whose rows
    // older rollups lack): of two collectors starting at once, one rebuilds and clears it,
    // the other finds nothing owed.
    let requests = "SELECT count(*) FROM rollup_rebuild_requests";
    let owed: i64 = sqlx::query_scalar(requests).fetch_one(&pool).await.unwrap();
    assert_eq!(
        owed, 0,
        "the migrations' requests were served when the app started"
    );
    sqlx::query("DELETE FROM rollup_hourly WHERE dim >= 8")
        .execute(&pool)
        .await
        .unwrap();
    assert_ne!(snapshot(&pool).await, built, "no UTM rows to rebuild");
    sqlx::query("INSERT INTO rollup_rebuild_requests (reason) VALUES ('test')")
        .execute(&pool)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        rollup::rebuild_if_requested(&pool),
        rollup::rebuild_if_requested(&pool)
    );
    let mut runs = [a.unwrap(), b.unwrap()];
    runs.sort();
    assert_eq!(runs, [None, Some(counted)]);
    assert_eq!(snapshot(&pool).await, built);
    let owed: i64 = sqlx::query_scalar(requests).fetch_one(&pool).await.unwrap();
    assert_eq!(owed, 0);
}

/// One page view of session `session` by `visitor` at `ts` (ms), event id `n`.
fn view(n: u64, session: &str, visitor: &str, ts: u64, path: &str) -> Value {
    json!({
        "id": format!("0190b6f0-0000-7000-8000-{n:012}"),
        "name": "page_view",
        "ts": ts,
        "anonymous_id": visitor,
        "session_id": session,
        "context": {"path": path},
    })
}

#[tokio::test]
async fn a_session_extended_batch_by_batch_across_an_hour_moves_its_figures() {
    let app = app(Backend::Postgres).await;
    let pool = pool_of(&app).await;
    let raw = PgStore::without_rollups(pool.clone());
    let now = Utc::now().timestamp_millis() as u64;
    // The last hour boundary at least 90 minutes back, so every event is in the past.
    let boundary = (now - 90 * 60_000) / 3_600_000 * 3_600_000;
    let min = 60_000;
    let q = Query {
        project_id: app.project.id,
        from: DateTime::from_timestamp_millis((boundary - 3 * 3_600_000) as i64).unwrap(),
        to: Utc::now() + Duration::minutes(1),
        filters: Filters::default(),
    };
    // Visitor w has a second session that exits on /a, so /a keeps w after s1 leaves it.
    let batches = [
        // A bounce on /a ten minutes before the boundary, and w's other session.
        vec![
            view(1, "s1", "v", boundary - 10 * min, "/a"),
            view(2, "s2", "w", boundary - 30 * min, "/a"),
            view(3, "s3", "w", boundary - 20 * min, "/a"),
        ],
        // Extended past the boundary: no longer a bounce, exit /b, longer.
        vec![
            view(4, "s1", "v", boundary + 5 * min, "/b"),
            view(5, "s3", "w", boundary + 6 * min, "/c"),
        ],
        // An earlier page view: the session now starts an hour sooner, entry /z.
        vec![view(6, "s1", "v", boundary - 65 * min, "/z")],
        // A later one again.
        vec![view(7, "s1", "v", boundary + 40 * min, "/d")],
    ];
    let mut answers = Vec::new();
    for events in batches {
        post_as(&app, UAS[1], now, events).await;
        let summary = app.store.analytics_summary(&q).await.unwrap();
        assert_eq!(summary, raw.analytics_summary(&q).await.unwrap());
        answers.push(summary);
        assert_same_answers(app.store.as_ref(), &raw, &q).await;
    }
    // Not vacuous: bounces 3, 1, 1, 1 of 3 sessions (s2 stays one).
    let bounces: Vec<i64> = answers.iter().map(|a| a.5).collect();
    assert_eq!(bounces, [3, 1, 1, 1]);
    let hours: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT hour, sessions FROM rollup_session_hours WHERE sessions <> 0 ORDER BY hour",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let hour = |ms: u64| DateTime::from_timestamp_millis(ms as i64).unwrap();
    assert_eq!(
        hours,
        [
            (hour(boundary - 2 * 3_600_000), 1),
            (hour(boundary - 3_600_000), 2)
        ]
    );

    // Stale entry/exit rows (their visitors may hold one that left) are read from the
    // sessions, not from their HyperLogLog: give each a visitor it does not have.
    app.execute(
        "UPDATE rollup_session_ends SET stale = true, \
             visitors = hll_add(visitors, hll_hash_text('ghost'))",
    )
    .await;
    assert_same_answers(app.store.as_ref(), &raw, &q).await;
    // The drain recomputes them: the rebuild finds the same rollups.
    let built = snapshot(&pool).await;
    assert!(!built.iter().any(|r| r.0.ends_with(" true")), "{built:?}");
    rollup::rebuild(&pool, Some(app.project.id)).await.unwrap();
    assert_eq!(snapshot(&pool).await, built);
}

#[tokio::test]
async fn visitors_are_within_the_hyperloglog_error_on_a_larger_set() {
    let app = app(Backend::Postgres).await;
    let pool = pool_of(&app).await;
    // 20,000 events of 5,000 visitors over the last five hours, written directly, then
    // counted into the rollups.
    sqlx::query(
        "INSERT INTO events (project_id, id, ts, name, anonymous_id, session_id, context, \
             sent_at, received_at, time, browser) \
         SELECT $1, gen_random_uuid(), t, 'page_view', 'v' || (i % 5000), 's' || (i % 8000), \
             jsonb_build_object('path', '/p' || (i % 20)), t, t, t, 'Firefox' \
         FROM generate_series(1, 20000) AS i, \
             LATERAL (SELECT now() - i * interval '900 milliseconds' AS t) AS x",
    )
    .bind(app.project.id)
    .execute(&pool)
    .await
    .unwrap();
    rollup::rebuild(&pool, Some(app.project.id)).await.unwrap();
    let raw = PgStore::without_rollups(pool.clone());
    let q = Query {
        project_id: app.project.id,
        from: Utc::now() - Duration::hours(6),
        to: Utc::now() + Duration::minutes(1),
        filters: Filters::default(),
    };
    let (estimated, exact) = (
        app.store.analytics_summary(&q).await.unwrap(),
        raw.analytics_summary(&q).await.unwrap(),
    );
    assert_eq!(exact.0, 5000);
    // log2m 11: a standard error of 1.04 / sqrt(2048) = 2.3 %; allow three of them.
    let error = (estimated.0 - exact.0).abs() as f64 / exact.0 as f64;
    assert!(error < 0.07, "{} visitors estimated for 5000", estimated.0);
    // Everything but visitors is exact.
    assert_eq!(
        (estimated.1, estimated.2, estimated.3, estimated.5),
        (exact.1, exact.2, exact.3, exact.5)
    );
    let (rows, exact_rows) = (
        app.store
            .analytics_breakdown(&q, &Dimension::Page, 100)
            .await
            .unwrap(),
        raw.analytics_breakdown(&q, &Dimension::Page, 100)
            .await
            .unwrap(),
    );
    assert_eq!(rows.len(), 20);
    for (key, visitors, events) in &exact_rows {
        let (_, v, e) = rows.iter().find(|r| &r.0 == key).unwrap();
        assert_eq!(e, events, "{key}");
        assert!(
            (v - visitors).abs() as f64 / (*visitors as f64) < 0.07,
            "{key}: {v} for {visitors}"
        );
    }
}

/// Without the rollup tables (a server without the hll extension) inserts and stats work on
/// raw events alone.
#[tokio::test]
async fn without_the_rollup_tables_the_stats_come_from_raw_events() {
    let app = app(Backend::Postgres).await;
    // Before the store's first insert or query, which is when it looks for them.
    app.execute("DROP TABLE rollup_hourly, rollup_sessions, rollup_session_hours, rollup_inbox")
        .await;
    let sent_at = Utc::now().timestamp_millis() as u64;
    load(&app, sent_at).await;
    let pool = pool_of(&app).await;
    let raw = PgStore::without_rollups(pool.clone());
    let q = Query {
        project_id: app.project.id,
        from: Utc::now() - Duration::hours(10),
        to: DateTime::from_timestamp_millis(sent_at as i64).unwrap(),
        filters: Filters::default(),
    };
    let summary = app.store.analytics_summary(&q).await.unwrap();
    assert_eq!(summary, raw.analytics_summary(&q).await.unwrap());
    // 24 sessions, 18 of them not the bot's, by 7 visitors.
    assert_eq!((summary.0, summary.1), (7, 18));
    let a = app
        .get(&format!(
            "/v1/stats/breakdown?by=page&key={}",
            app.project.read_key
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["rows"].as_array().unwrap().len(), 5, "{}", a.text);
}
