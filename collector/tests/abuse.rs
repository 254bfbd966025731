//! Attacks and faults against the real binary on real Postgres: what a client holding a
//! write key (every page carries one) can make the collector spend, and what a database
//! fault is answered. Each attack asserts its answer, that another project's valid traffic
//! is still accepted during it, and where it matters that peak memory stays bounded.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

const SENT: u64 = 1_763_800_005_000;

/// Hex text that gzip cannot shrink much (about 2:1): lets a body pass the collector's
/// inflation-ratio check, as a real attacker would pad it.
fn padding(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 32);
    while out.len() < bytes {
        out.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    out
}

/// A gzipped body of about `inflated` bytes: `{"sent_at", "pad", "events": <events>}`
/// where `events` is written by `write_events` (until the size is reached).
fn bomb(inflated: usize, write_events: impl Fn(&mut Vec<u8>, usize)) -> Vec<u8> {
    let pad = padding(240 * 1024);
    let mut json = Vec::with_capacity(inflated + 1024);
    write!(json, r#"{{"sent_at":{SENT},"pad":"{pad}","events":"#).unwrap();
    let room = inflated.saturating_sub(json.len() + 2);
    write_events(&mut json, room);
    json.push(b'}');
    gzip(&json)
}

/// `[0,0,0,...]`: millions of tiny events (the cap is 1,000).
fn zeros_events(json: &mut Vec<u8>, room: usize) {
    json.push(b'[');
    for _ in 0..room / 2 {
        json.extend_from_slice(b"0,");
    }
    json.extend_from_slice(b"0]");
}

/// One event whose `id` is an array of millions of zeros.
fn huge_id_event(json: &mut Vec<u8>, room: usize) {
    json.extend_from_slice(br#"[{"id":["#);
    for _ in 0..room / 2 {
        json.extend_from_slice(b"0,");
    }
    json.extend_from_slice(b"0]}]");
}

async fn post(
    client: &reqwest::Client,
    server: &Server,
    key: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let response = client
        .post(server.url(&format!("/v1/batch?key={key}")))
        .header("content-type", "text/plain")
        .header("origin", ORIGIN)
        .body(body)
        .send()
        .await
        .expect("the collector answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A valid batch of `n` events starting at event number `first`.
fn valid(first: u64, n: u64) -> Vec<u8> {
    gzip(&batch(SENT, (first..first + n).map(event).collect()))
}

async fn stored(db: &TestDb) -> i64 {
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplification_bodies_keep_memory_bounded_and_other_projects_served() {
    let db = TestDb::create().await;
    let attacker = add_project_cli(&db.url, "attacker");
    let victim = add_project_cli(&db.url, "victim");
    let (attacker_key, victim_key) = (
        attacker["write_key"].as_str().unwrap().to_owned(),
        victim["write_key"].as_str().unwrap().to_owned(),
    );
    let server = Server::start(&db.url, &[]).await;
    let client = reqwest::Client::new();

    // 10 MiB inflated each (the most a batch may inflate to), padded past the ratio check.
    let zeros = bomb(10 * 1024 * 1024 - 4096, zeros_events);
    let huge_id = bomb(10 * 1024 * 1024 - 4096, huge_id_event);
    assert!(zeros.len() > 100 * 1024 && huge_id.len() > 100 * 1024);
    let before = server.peak_rss();

    // 32 attack requests at once; the victim posts meanwhile.
    let started = Instant::now();
    let mut attacks = Vec::new();
    for round in 0..1 {
        for i in 0..32 {
            let body = if i % 2 == 0 {
                zeros.clone()
            } else {
                huge_id.clone()
            };
            let (client, key) = (client.clone(), attacker_key.clone());
            let server_url = server.url(&format!("/v1/batch?key={key}"));
            attacks.push(tokio::spawn(async move {
                let r = client
                    .post(server_url)
                    .header("content-type", "text/plain")
                    .header("origin", ORIGIN)
                    .body(body)
                    .send()
                    .await
                    .expect("answer");
                let status = r.status().as_u16();
                (round, i, status, r.text().await.unwrap_or_default())
            }));
        }
    }
    let mut victim_accepted = 0;
    for b in 0..10u64 {
        let (status, text) = post(&client, &server, &victim_key, valid(b * 10, 10)).await;
        assert_eq!(
            status, 200,
            "the victim's batch {b} during the attack: {text}"
        );
        victim_accepted += 10;
    }
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    for a in attacks {
        let (_, i, status, text) = a.await.unwrap();
        *answers.entry(status).or_default() += 1;
        match status {
            // Too many events: refused as too large, with the real count.
            413 => assert!(i % 2 == 0 && text.contains("events in one batch"), "{text}"),
            // The huge event is rejected by itself; its id is not reported.
            200 => {
                assert!(i % 2 == 1, "{text}");
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["accepted"], 0);
                assert_eq!(v["rejected"][0]["index"], 0);
                assert!(
                    v["rejected"][0].get("id").is_none_or(|id| id.is_null()),
                    "{text}"
                );
            }
            // Body memory taken by the attacker's other requests: retry later.
            503 => assert!(text.contains("unavailable"), "{text}"),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let peak = server.peak_rss();
    eprintln!(
        "32 amplification requests in {:?}: {answers:?}; peak RSS {} MB (before: {} MB)",
        started.elapsed(),
        peak >> 20,
        before >> 20
    );
    assert!(
        peak < 200 << 20,
        "peak RSS {} MB with 32 amplification requests at once (limit 200 MB)",
        peak >> 20
    );
    assert_eq!(stored(&db).await, victim_accepted);

    // One at a time, each is answered for what it is: too many events (with the real
    // count), and the oversized event rejected alone.
    let (status, text) = post(&client, &server, &attacker_key, zeros).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("events in one batch"), "{text}");
    let (status, text) = post(&client, &server, &attacker_key, huge_id).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("too_large"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_do_not_hold_the_permits_everyone_needs() {
    let db = TestDb::create().await;
    let attacker = add_project_cli(&db.url, "attacker");
    let victim = add_project_cli(&db.url, "victim");
    let server = Server::start(&db.url, &["--max-inflight-batches", "4"]).await;
    let client = reqwest::Client::new();

    // Sixteen requests announce a body and trickle it a byte every 200 ms.
    let key = attacker["write_key"].as_str().unwrap();
    let mut trickles = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
            .await
            .unwrap();
        let head = format!(
            "POST /v1/batch?key={key} HTTP/1.1\r\nhost: x\r\norigin: {ORIGIN}\r\n\
             content-type: text/plain\r\ncontent-length: 1000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        trickles.push(tokio::spawn(async move {
            for _ in 0..15 {
                if stream.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim_key = victim["write_key"].as_str().unwrap();
    for b in 0..5u64 {
        let (status, text) = post(&client, &server, victim_key, valid(b * 10, 10)).await;
        assert_eq!(
            status, 200,
            "the victim's batch {b} while bodies trickle in: {text}"
        );
    }
    for t in trickles {
        t.abort();
    }
    assert_eq!(stored(&db).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_503_and_the_batch_is_stored_after_recovery() {
    let db = TestDb::create().await;
    let project = add_project_cli(&db.url, "p");
    let key = project["write_key"].as_str().unwrap();
    let server = Server::start(&db.url, &[]).await;
    let client = reqwest::Client::new();
    let (status, text) = post(&client, &server, key, valid(0, 5)).await;
    assert_eq!(status, 200, "{text}");

    // A failover to a read-only standby, as the collector sees it: every new transaction is
    // read-only and the open connections are cut.
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    let cut = |admin: sqlx::PgPool, name: String| async move {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&admin)
        .await
        .unwrap();
    };
    sqlx::query(&format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        db.name
    ))
    .execute(&admin)
    .await
    .unwrap();
    cut(admin.clone(), db.name.clone()).await;

    let refused = client
        .post(server.url(&format!("/v1/batch?key={key}")))
        .header("content-type", "text/plain")
        .header("origin", ORIGIN)
        .body(valid(100, 5))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        503,
        "a read-only database is not the client's fault"
    );
    assert!(refused.headers().contains_key("retry-after"));
    let text = refused.text().await.unwrap();
    assert!(text.contains("read-only"), "{text}");

    sqlx::query(&format!(
        "ALTER DATABASE {} RESET default_transaction_read_only",
        db.name
    ))
    .execute(&admin)
    .await
    .unwrap();
    cut(admin.clone(), db.name.clone()).await;
    admin.close().await;

    // The SDK sends the same batch again: now it is stored.
    let (status, text) = post(&client, &server, key, valid(100, 5)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(stored(&db).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_on_one_fresh_database_store_every_event_once() {
    let db = TestDb::create().await;
    // Both start at once on a database with no partitions yet: their start-up partition
    // upkeep must not trip over each other or over the first batches.
    let (a, b) = tokio::join!(Server::start(&db.url, &[]), Server::start(&db.url, &[]));
    // A project added while both serve is known to both (NOTIFY, or the periodic reload).
    let project = add_project_cli(&db.url, "shared");
    let key = project["write_key"].as_str().unwrap().to_owned();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    for server in [&a, &b] {
        loop {
            let (status, text) = post(&client, server, &key, valid(0, 1)).await;
            if status == 200 {
                break;
            }
            assert_eq!(status, 401, "{text}");
            assert!(
                Instant::now() < deadline,
                "the new project is not known after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every batch goes to both collectors at once (a retry landing elsewhere): each event
    // is stored once, and between them the two answers count it once as accepted.
    let mut accepted = 0;
    for n in 0..40u64 {
        let body = valid(1000 + n * 10, 10);
        let (ra, rb) = tokio::join!(
            post(&client, &a, &key, body.clone()),
            post(&client, &b, &key, body)
        );
        for (status, text) in [&ra, &rb] {
            assert_eq!(*status, 200, "{text}");
        }
        let count = |t: &str| {
            serde_json::from_str::<serde_json::Value>(t).unwrap()["accepted"]
                .as_u64()
                .unwrap()
        };
        accepted += count(&ra.1) + count(&rb.1);
    }
    assert_eq!(accepted, 400);
    assert_eq!(stored(&db).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_and_partition_upkeep_do_not_trip_over_each_other() {
    let app = app(Backend::Postgres).await;
    // Events six months ahead land in the default partition until upkeep creates their
    // month's partition, moving them there, while more arrive.
    let ahead = chrono::Utc::now() + chrono::Duration::days(183);
    let ts = ahead.timestamp_millis() as u64;
    let future_batch = |b: u64| {
        let events = (0..20)
            .map(|i| {
                let mut e = event(b * 100 + i);
                // Spread over the 24 months from six months ahead.
                let month = (b * 20 + i) % 24;
                e["ts"] = serde_json::json!(ts + month * 31 * 86_400_000 + b * 100 + i);
                e
            })
            .collect();
        batch(ts + 24 * 31 * 86_400_000, events)
    };
    let posts = async {
        let mut statuses = Vec::new();
        for round in 0..30u64 {
            let bodies = (0..4).map(|k| future_batch(round * 4 + k)).collect();
            for a in app.post_concurrently(bodies).await {
                statuses.push((a.status, a.text));
            }
        }
        statuses
    };
    let upkeep = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        app.store
            .maintain_partitions(chrono::Utc::now(), 32, 0)
            .await
            .expect("partition upkeep")
    };
    let (statuses, report) = tokio::join!(posts, upkeep);
    assert!(!report.created.is_empty(), "{report:?}");
    for (status, text) in &statuses {
        assert_eq!(*status, axum::http::StatusCode::OK, "{text}");
    }
    // Stats count by skew-corrected time (before now: the batch was "sent" after its
    // events' clock); the rows themselves are in the new partitions.
    assert_eq!(app.stored().await, 2400);
}
