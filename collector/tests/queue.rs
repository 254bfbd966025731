//! The queue past one machine, end to end: the real `tracklet-collector` binary as collectors
//! (`serve --queue`) and sinks (`sink`), the real NATS JetStream server on 127.0.0.1:4222,
//! real Postgres. Every test has its own database and its own stream (deleted afterwards),
//! and checks that every event a collector acknowledged is stored exactly once.
//!
//! NATS is required: a missing server fails these tests (it never skips them).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

const NATS: &str = "nats://127.0.0.1:4222";
const NATS_REQUIRED: &str = "NATS with JetStream is required on 127.0.0.1:4222: install \
    nats-server (Debian package nats-server) and start it with `nats-server -js -a 127.0.0.1 \
    -p 4222`";
const SENT: u64 = 1_763_800_005_000;
/// Longest wait for the sinks to store what was acknowledged.
const STORE_DEADLINE: Duration = Duration::from_secs(60);

/// A stream of the test's own (unique name and subjects), deleted when dropped.
struct TestStream {
    name: String,
    prefix: String,
}

impl TestStream {
    async fn create() -> TestStream {
        let client = async_nats::connect(NATS)
            .await
            .unwrap_or_else(|e| panic!("{NATS_REQUIRED} ({e})"));
        let info = client
            .request("$JS.API.INFO", "".into())
            .await
            .unwrap_or_else(|e| panic!("{NATS_REQUIRED}: JetStream does not answer ({e})"));
        let info = String::from_utf8_lossy(&info.payload);
        assert!(
            info.contains("account_info_response") && !info.contains("\"error\""),
            "{NATS_REQUIRED}: JetStream is not enabled ({info})"
        );
        let id = Uuid::new_v4().simple().to_string();
        TestStream {
            name: format!("TRACKLET_TEST_{id}"),
            prefix: format!("tracklet_test.{id}"),
        }
    }

    /// `--queue ...` flags for a collector or a sink on this stream.
    fn args(&self, max_mb: u32) -> Vec<String> {
        [
            "--queue",
            NATS,
            "--queue-stream",
            &self.name,
            "--queue-subject-prefix",
            &self.prefix,
            "--queue-max-mb",
            &max_mb.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = async_nats::connect(NATS).await.ok()?;
                let js = async_nats::jetstream::new(client);
                js.delete_stream(&name).await.ok()
            })
        })
        .join();
    }
}

/// A running `sink`, killed (SIGKILL) when dropped.
struct Sink {
    child: std::process::Child,
    port: u16,
}

impl Sink {
    async fn start(database_url: &str, stream: &TestStream, extra: &[&str]) -> Sink {
        let port = free_port();
        let child = std::process::Command::new(BIN)
            .args(["sink", "--database-url", database_url, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(stream.args(256))
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the sink");
        let sink = Sink { child, port };
        assert!(
            wait_until_up(&reqwest::Client::new(), port).await,
            "the sink did not start"
        );
        sink
    }

    async fn readyz(&self) -> (u16, Value) {
        let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.port))
            .await
            .expect("sink /readyz");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// SIGKILL: no draining, no acknowledgements sent.
    fn kill_9(&mut self) {
        self.child.kill().expect("kill -9 the sink");
        let _ = self.child.wait();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A collector publishing to `stream` (`--queue` pointing at NATS or, given, elsewhere).
async fn collector(db: &TestDb, stream: &TestStream, queue_url: Option<&str>) -> Server {
    let mut args = stream.args(256);
    if let Some(url) = queue_url {
        args[1] = url.to_owned();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&db.url, &args).await
}

/// Batch `b` of a run: `batch_id` `run-b` and `events` events with ids unique in the run.
fn numbered_batch(run: u64, b: u64, events: u64) -> (String, Vec<u8>) {
    let batch_id = format!("{run}-{b}");
    let events = (0..events)
        .map(|i| event(run * 1_000_000 + b * 1_000 + i))
        .collect();
    (batch_id.clone(), batch_with_id(SENT, batch_id, events))
}

fn ids_in(body: &[u8]) -> Vec<Uuid> {
    let batch: Value = serde_json::from_slice(body).expect("a batch");
    batch["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            e["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("an id")
        })
        .collect()
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

async fn post(client: &reqwest::Client, server: &Server, key: &str, body: Vec<u8>) -> Answer {
    let r = client
        .post(server.url(&format!("/v1/batch?key={key}")))
        .header("content-type", "text/plain")
        .header("origin", ORIGIN)
        .body(body)
        .send()
        .await
        .expect("the collector answers");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Answer {
        status,
        retry_after,
        json: r.json().await.unwrap_or(Value::Null),
    }
}

/// Sends every batch as the SDK does (a 503 is retried, on the next collector, up to 20
/// times) with 16 requests in flight; returns the ids of the events acknowledged.
async fn send_all(servers: &[&Server], key: &str, batches: Vec<Vec<u8>>) -> HashSet<Uuid> {
    let client = reqwest::Client::new();
    let sent = futures_util::stream::iter(batches.into_iter().enumerate())
        .map(|(n, body)| {
            let client = client.clone();
            async move {
                for attempt in 0..20 {
                    let server = servers[(n + attempt) % servers.len()];
                    let a = post(&client, server, key, body.clone()).await;
                    match a.status {
                        200 => return ids_in(&body),
                        503 => tokio::time::sleep(Duration::from_millis(200)).await,
                        other => panic!("batch {n}: {other} {}", a.json),
                    }
                }
                panic!("batch {n} still refused after 20 attempts");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    sent.into_iter().flatten().collect()
}

/// Event ids stored for `project`, with their repeats.
async fn stored_ids(db: &TestDb, project: Uuid) -> Vec<Uuid> {
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let ids = sqlx::query_scalar("SELECT id FROM events WHERE project_id = $1")
        .bind(project)
        .fetch_all(&pool)
        .await
        .expect("select ids");
    pool.close().await;
    ids
}

/// Waits until `expected` events are stored, then checks that they are exactly the
/// acknowledged ones, each once.
async fn assert_stored_exactly_once(db: &TestDb, project: Uuid, acknowledged: &HashSet<Uuid>) {
    let started = Instant::now();
    let mut ids = stored_ids(db, project).await;
    while ids.len() < acknowledged.len() && started.elapsed() < STORE_DEADLINE {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ids = stored_ids(db, project).await;
    }
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event was stored twice");
    let missing = acknowledged.difference(&unique).count();
    assert_eq!(
        missing, 0,
        "{missing} acknowledged events not stored after {STORE_DEADLINE:?}"
    );
    assert_eq!(&unique, acknowledged, "stored events that were never sent");
}

/// Asks a collector which of `batch_ids` arrived (the receipts the sinks wrote).
async fn arrived(server: &Server, key: &str, batch_ids: &[String]) -> HashSet<String> {
    let client = reqwest::Client::new();
    let mut arrived = HashSet::new();
    for chunk in batch_ids.chunks(50) {
        let r = client
            .post(server.url(&format!("/v1/batch/status?key={key}")))
            .body(json!({ "batch_ids": chunk }).to_string())
            .send()
            .await
            .expect("batch status");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("JSON");
        for id in body["arrived"].as_array().expect("arrived") {
            arrived.insert(id.as_str().unwrap_or_default().to_owned());
        }
    }
    arrived
}

fn project_of(db: &TestDb) -> (Uuid, String) {
    let project = add_project_cli(&db.url, "shop");
    (
        project["id"].as_str().unwrap().parse().unwrap(),
        project["write_key"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn two_collectors_and_two_sinks_store_every_acknowledged_event_once() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let (project, key) = project_of(&db);
    let (a, b) = (
        collector(&db, &stream, None).await,
        collector(&db, &stream, None).await,
    );
    let sinks = [
        Sink::start(&db.url, &stream, &[]).await,
        Sink::start(&db.url, &stream, &[]).await,
    ];
    let (batch_ids, bodies): (Vec<_>, Vec<_>) = (0..200).map(|n| numbered_batch(1, n, 20)).unzip();
    let acknowledged = send_all(&[&a, &b], &key, bodies.clone()).await;
    assert_eq!(acknowledged.len(), 4000);
    assert_stored_exactly_once(&db, project, &acknowledged).await;
    assert_eq!(
        arrived(&a, &key, &batch_ids).await.len(),
        batch_ids.len(),
        "every batch has its receipt (written by the sinks)"
    );

    // Sent again at once (a beacon and a retry racing): JetStream keeps one copy.
    let client = reqwest::Client::new();
    for body in bodies.into_iter().take(5) {
        let again = post(&client, &b, &key, body).await;
        assert_eq!(again.status, 200, "{}", again.json);
        assert_eq!(again.json["duplicates"], 20, "{}", again.json);
        assert_eq!(again.json["accepted"], 0, "{}", again.json);
    }
    assert_stored_exactly_once(&db, project, &acknowledged).await;

    // Both sinks are ready and report the (now empty) backlog.
    for sink in &sinks {
        let started = Instant::now();
        loop {
            let (status, body) = sink.readyz().await;
            assert_eq!(status, 200, "{body}");
            if body["lag"]["stream_messages"] == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the backlog is not reported empty: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn a_sink_killed_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let (project, key) = project_of(&db);
    let server = collector(&db, &stream, None).await;
    // Everything is in the stream before the first sink starts.
    let bodies = (0..300).map(|n| numbered_batch(2, n, 20).1).collect();
    let acknowledged = send_all(&[&server], &key, bodies).await;
    assert_eq!(acknowledged.len(), 6000);

    // A slow sink (small transactions, one at a time) is killed once it has committed some.
    let slow = [
        "--commit-max-rows",
        "40",
        "--commit-concurrency",
        "1",
        "--fetch-max",
        "20",
        "--max-inflight",
        "40",
        "--ack-wait-secs",
        "2",
    ];
    let mut first = Sink::start(&db.url, &stream, &slow).await;
    let started = Instant::now();
    let at_kill = loop {
        let n = stored_ids(&db, project).await.len();
        if n > 0 {
            first.kill_9();
            break n;
        }
        assert!(
            started.elapsed() < STORE_DEADLINE,
            "the first sink stored nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let after_kill = stored_ids(&db, project).await.len();
    assert!(
        after_kill < acknowledged.len(),
        "the sink was killed after it had stored everything ({at_kill} then {after_kill}): \
         nothing was left mid-stream"
    );

    // Its messages in flight (committed or not, acknowledged or not) are delivered again.
    let _second = Sink::start(&db.url, &stream, &[]).await;
    assert_stored_exactly_once(&db, project, &acknowledged).await;
}

#[tokio::test]
async fn database_unavailable_for_ten_seconds_while_collectors_keep_acknowledging() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let (project, key) = project_of(&db);
    let server = collector(&db, &stream, None).await;
    let sink = Sink::start(&db.url, &stream, &[]).await;
    let before = (0..50).map(|n| numbered_batch(3, n, 20).1).collect();
    let mut acknowledged = send_all(&[&server], &key, before).await;
    assert_stored_exactly_once(&db, project, &acknowledged).await;

    // The test's own database refuses connections; its open ones are cut.
    let admin = sqlx::PgPool::connect(&admin_url()).await.expect("admin");
    let set_allowed =
        |allowed: bool| format!("ALTER DATABASE {} ALLOW_CONNECTIONS {allowed}", db.name);
    sqlx::query(&set_allowed(false))
        .execute(&admin)
        .await
        .expect("close");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db.name)
        .execute(&admin)
        .await
        .expect("terminate");
    let outage = Instant::now();

    // The collector keeps acknowledging (its answers do not need the database)...
    let client = reqwest::Client::new();
    for n in 50..150 {
        let (_, body) = numbered_batch(3, n, 20);
        let ids = ids_in(&body);
        let a = post(&client, &server, &key, body).await;
        assert_eq!(a.status, 200, "batch {n} during the outage: {}", a.json);
        acknowledged.extend(ids);
    }
    // ...and stays ready: batches need JetStream, not the database.
    let ready = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    // Meanwhile the sink is not ready and reports the backlog.
    let seen_backlog = loop {
        let (status, body) = sink.readyz().await;
        if status == 503 && body["lag"]["stream_messages"].as_u64().unwrap_or(0) > 0 {
            break body;
        }
        assert!(
            outage.elapsed() < Duration::from_secs(9),
            "the sink did not report the outage and its backlog: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(seen_backlog["database"], "ok", "{seen_backlog}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    assert!(
        stored_ids_unavailable(&db).await,
        "the database was reachable during the outage"
    );

    sqlx::query(&set_allowed(true))
        .execute(&admin)
        .await
        .expect("reopen");
    admin.close().await;
    assert_eq!(acknowledged.len(), 3000);
    assert_stored_exactly_once(&db, project, &acknowledged).await;
}

/// True while the test's database refuses connections.
async fn stored_ids_unavailable(db: &TestDb) -> bool {
    sqlx::PgPool::connect(&db.url).await.is_err()
}

#[tokio::test]
async fn nats_unreachable_is_503_and_the_sdk_retry_stores_everything() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let (project, key) = project_of(&db);
    let closed = format!("nats://127.0.0.1:{}", free_port());
    let cut_off = collector(&db, &stream, Some(&closed)).await;
    let client = reqwest::Client::new();
    let (batch_ids, bodies): (Vec<_>, Vec<_>) = (0..5).map(|n| numbered_batch(4, n, 20)).unzip();
    for body in &bodies {
        let a = post(&client, &cut_off, &key, body.clone()).await;
        assert_eq!(a.status, 503, "{}", a.json);
        assert_eq!(a.json["error"], "unavailable", "{}", a.json);
        let retry: u64 = a
            .retry_after
            .as_deref()
            .and_then(|s| s.parse().ok())
            .expect("Retry-After");
        assert!(retry >= 1);
    }
    let ready = client.get(cut_off.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["stream"]["status"], "unreachable", "{ready}");
    assert!(
        stored_ids(&db, project).await.is_empty(),
        "nothing was acknowledged, nothing is stored"
    );

    // The SDK sends the same batches again, now to a collector whose queue works.
    let working = collector(&db, &stream, None).await;
    let _sink = Sink::start(&db.url, &stream, &[]).await;
    let acknowledged = send_all(&[&working], &key, bodies).await;
    assert_eq!(acknowledged.len(), 100);
    assert_stored_exactly_once(&db, project, &acknowledged).await;
    assert_eq!(arrived(&working, &key, &batch_ids).await.len(), 5);
}

#[tokio::test]
async fn a_full_stream_is_503_until_a_sink_drains_it() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let (project, key) = project_of(&db);
    let mut args = stream.args(1);
    args.push("--queue-publish-timeout-ms".into());
    args.push("2000".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&db.url, &args).await;
    let client = reqwest::Client::new();
    // 1 MiB holds a few hundred of these batches; no sink runs yet.
    let mut acknowledged = HashSet::new();
    let mut refused = None;
    for n in 0..2000 {
        let (_, body) = numbered_batch(5, n, 20);
        let ids = ids_in(&body);
        let a = post(&client, &server, &key, body.clone()).await;
        match a.status {
            200 => acknowledged.extend(ids),
            503 => {
                refused = Some((a, body));
                break;
            }
            other => panic!("{other} {}", a.json),
        }
    }
    let (full, body) = refused.expect("the stream never filled up");
    assert!(full.retry_after.is_some());
    assert!(
        full.json["message"]
            .as_str()
            .unwrap_or_default()
            .contains("full"),
        "{}",
        full.json
    );
    assert!(!acknowledged.is_empty());

    // A sink drains the stream; the refused batch is then taken.
    let _sink = Sink::start(&db.url, &stream, &[]).await;
    acknowledged.extend(send_all(&[&server], &key, vec![body]).await);
    assert_stored_exactly_once(&db, project, &acknowledged).await;
}

#[tokio::test]
async fn a_sink_commits_into_the_embedded_sqlite_file_too() {
    let stream = TestStream::create().await;
    let path = std::env::temp_dir().join(format!(
        "tracklet-queue-{}.sqlite3",
        Uuid::new_v4().simple()
    ));
    let url = format!("sqlite:{}", path.display());
    let project = add_project_cli(&url, "shop");
    let key = project["write_key"].as_str().unwrap().to_owned();
    let args = stream.args(256);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&url, &args).await;
    let _sink = Sink::start(&url, &stream, &[]).await;
    let (batch_ids, bodies): (Vec<_>, Vec<_>) = (0..20).map(|n| numbered_batch(6, n, 20)).unzip();
    let acknowledged = send_all(&[&server], &key, bodies).await;
    assert_eq!(acknowledged.len(), 400);
    // The batch status answer comes from receipts the sink wrote with the rows.
    let started = Instant::now();
    while arrived(&server, &key, &batch_ids).await.len() < batch_ids.len() {
        assert!(
            started.elapsed() < STORE_DEADLINE,
            "receipts missing after {STORE_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM events")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    let stored: HashSet<Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    assert_eq!(
        stored.len(),
        ids.len(),
        "an event stored twice (or an unreadable id)"
    );
    assert_eq!(stored, acknowledged);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test]
async fn ingest_health_shows_the_sinks_lag() {
    let (db, stream) = (TestDb::create().await, TestStream::create().await);
    let project = add_project_cli(&db.url, "shop");
    let id: Uuid = project["id"].as_str().unwrap().parse().unwrap();
    let key = project["write_key"].as_str().unwrap().to_owned();
    let read_key = project["read_key"].as_str().unwrap().to_owned();
    let server = collector(&db, &stream, None).await;
    let client = reqwest::Client::new();
    let health = || async {
        let r = client
            .get(server.url(&format!("/v1/stats/health?key={read_key}")))
            .send()
            .await
            .expect("health");
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.expect("health JSON")
    };
    // No sink has run yet: no consumer, so no lag to show.
    assert!(health().await["queue_lag"].is_null());

    // A sink creates the consumer and commits; killed, it leaves the next batches behind.
    let mut sink = Sink::start(&db.url, &stream, &[]).await;
    let first = (0..5).map(|n| numbered_batch(7, n, 20).1).collect();
    let mut acknowledged = send_all(&[&server], &key, first).await;
    assert_stored_exactly_once(&db, id, &acknowledged).await;
    sink.kill_9();
    let rest: Vec<Vec<u8>> = (5..12).map(|n| numbered_batch(7, n, 20).1).collect();
    acknowledged.extend(send_all(&[&server], &key, rest).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lag = loop {
        let lag = health().await["queue_lag"].clone();
        if lag["stream_messages"] == 7 {
            break lag;
        }
        assert!(
            Instant::now() < deadline,
            "the health never showed 7 batches behind: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        lag["oldest_pending_secs"]
            .as_f64()
            .is_some_and(|s| s >= 0.0),
        "{lag}"
    );

    // A sink again: everything stored, and nothing behind.
    let _sink = Sink::start(&db.url, &stream, &[]).await;
    assert_stored_exactly_once(&db, id, &acknowledged).await;
    loop {
        let lag = health().await["queue_lag"].clone();
        if lag["stream_messages"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(20), "{lag}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
