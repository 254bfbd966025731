//! Webhooks end to end, with the real binary and a receiver on 127.0.0.1 that verifies the
//! Standard Webhooks signature of every request: retries (500, then 429 with Retry-After,
//! then 200) until every committed event arrived, `kill -9` mid-delivery, two collectors
//! sharing the queue, a 410 disabling a destination then `replay`, private addresses
//! refused, and SQLite with a secret rotation.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SENT: u64 = 1_763_800_100_000;

/// How the receiver answers attempt `n` (from 1) of a webhook-id on `path`: status and
/// `Retry-After` seconds.
type Plan = Arc<dyn Fn(&str, usize) -> (u16, Option<u64>) + Send + Sync>;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    id: String,
    signed: bool,
    signatures: usize,
    project: String,
    events: Vec<String>,
    names: Vec<String>,
    status: u16,
    arrived: Instant,
}

struct ReceiverState {
    /// Keys per path; every one must have signed the request.
    keys: HashMap<String, Vec<Vec<u8>>>,
    plan: Plan,
    delay: Duration,
    hits: Vec<Hit>,
    attempts: HashMap<String, usize>,
    in_flight: HashMap<String, usize>,
    in_flight_now: usize,
    max_in_flight: usize,
    /// A webhook-id being received twice at the same time.
    overlapped: bool,
}

#[derive(Clone)]
struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    port: u16,
}

fn key_of(secret: &str) -> Vec<u8> {
    BASE64
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret")
}

/// Every key signed `{id}.{timestamp}.{body}`, and nothing else is in the header.
fn verify(keys: &[Vec<u8>], headers: &HeaderMap, body: &[u8]) -> (bool, usize) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let sent: Vec<&str> = signature.split(' ').collect();
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    let all_signed = keys.iter().all(|key| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
        sent.contains(&expected.as_str())
    });
    (
        fresh && !keys.is_empty() && all_signed && sent.len() == keys.len(),
        sent.len(),
    )
}

async fn hook(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (attempt, delay, plan, signed, signatures) = {
        let mut s = r.state.lock().unwrap();
        let keys = s.keys.get(&path).cloned().unwrap_or_default();
        let (signed, signatures) = verify(&keys, &headers, &body);
        let attempt = {
            let n = s.attempts.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let concurrent = {
            let n = s.in_flight.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        s.overlapped |= concurrent > 1;
        s.in_flight_now += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight_now);
        (attempt, s.delay, s.plan.clone(), signed, signatures)
    };
    tokio::time::sleep(delay).await;
    let (status, retry_after) = plan(&path, attempt);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let events = json["data"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_owned();
    let hit = Hit {
        path,
        id: id.clone(),
        signed: signed && json["type"] == "events.committed" && json["timestamp"].is_string(),
        signatures,
        project: json["data"]["project"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        events: events.iter().map(|e| text(e, "id")).collect(),
        names: events.iter().map(|e| text(e, "name")).collect(),
        status,
        arrived: Instant::now(),
    };
    {
        let mut s = r.state.lock().unwrap();
        s.hits.push(hit);
        s.in_flight_now -= 1;
        if let Some(n) = s.in_flight.get_mut(&id) {
            *n -= 1;
        }
    }
    let mut response = (StatusCode::from_u16(status).unwrap(), "answer body").into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    response
}

impl Receiver {
    async fn start(plan: Plan, delay: Duration) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let receiver = Receiver {
            state: Arc::new(Mutex::new(ReceiverState {
                keys: HashMap::new(),
                plan,
                delay,
                hits: Vec::new(),
                attempts: HashMap::new(),
                in_flight: HashMap::new(),
                in_flight_now: 0,
                max_in_flight: 0,
                overlapped: false,
            })),
            port,
        };
        let app = axum::Router::new()
            .fallback(hook)
            .with_state(receiver.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn expect_keys(&self, path: &str, secrets: &[&str]) {
        let keys = secrets.iter().map(|s| key_of(s)).collect();
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(path.to_owned(), keys);
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.lock().unwrap().hits.clone()
    }

    fn set_plan(&self, plan: Plan) {
        self.state.lock().unwrap().plan = plan;
    }

    /// Event ids delivered (answered 2xx) on `path`.
    fn delivered(&self, path: &str) -> HashSet<String> {
        self.hits()
            .iter()
            .filter(|h| h.path == path && (200..300).contains(&h.status))
            .flat_map(|h| h.events.clone())
            .collect()
    }
}

fn always(status: u16) -> Plan {
    Arc::new(move |_, _| (status, None))
}

fn cli(db: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend(["--database-url", db]);
    run_cli(&all)
}

fn cli_json(db: &str, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = cli(db, args);
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
}

/// `destinations add` (private destinations allowed: the receiver is on 127.0.0.1).
fn add_destination(db: &str, project: &str, url: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "destinations",
        "add",
        "--allow-private-destinations",
        "--project",
        project,
        "--url",
        url,
    ];
    args.extend(extra);
    let added = cli_json(db, &args);
    let secret = added["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && key_of(&secret).len() == 32);
    (added["id"].as_str().unwrap().to_owned(), secret)
}

/// Events `first..first+count`, every third one named "Checkout Completed".
fn events(first: u64, count: u64) -> Vec<serde_json::Value> {
    (first..first + count)
        .map(|n| {
            let mut e = event(n);
            if n % 3 == 0 {
                e["name"] = serde_json::json!("Checkout Completed");
            }
            e
        })
        .collect()
}

fn ids(events: &[serde_json::Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Posts `events` in batches of 25; every batch is committed (200).
async fn post(server: &Server, write_key: &str, events: &[serde_json::Value]) {
    let client = reqwest::Client::new();
    for chunk in events.chunks(25) {
        let answer = client
            .post(server.url(&format!("/v1/batch?key={write_key}")))
            .body(batch(SENT, chunk.to_vec()))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    }
}

/// Waits until `done` holds; fails the test after 30 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `destinations status` for one destination.
fn status(db: &str, id: &str) -> serde_json::Value {
    let all = cli_json(db, &["destinations", "status", id]);
    assert_eq!(all.as_array().unwrap().len(), 1);
    all[0].clone()
}

async fn wait_for_status(
    db: &str,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(db, id);
        if done(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const FAST_RETRIES: &[&str] = &[
    "--allow-private-destinations",
    "--webhook-retry-schedule",
    "200ms,200ms,200ms,200ms,200ms",
    "--webhook-poll",
    "50ms",
];

#[tokio::test]
async fn retries_until_every_committed_event_arrives_signed() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    // Two failures, then 429 with Retry-After: 1, then accepted: four attempts each.
    let receiver = Receiver::start(
        Arc::new(|_, attempt| match attempt {
            1 | 2 => (500, None),
            3 => (429, Some(1)),
            _ => (204, None),
        }),
        Duration::ZERO,
    )
    .await;
    let (all_id, all_secret) = add_destination(&db.url, "shop", &receiver.url("/all"), &[]);
    let (_, buy_secret) = add_destination(
        &db.url,
        "shop",
        &receiver.url("/checkouts"),
        &["--events", "Checkout Completed,Refund", "--batch-size", "4"],
    );
    receiver.expect_keys("/all", &[&all_secret]);
    receiver.expect_keys("/checkouts", &[&buy_secret]);
    let listed = cli_json(&db.url, &["destinations", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(
        !listed.to_string().contains("whsec_"),
        "secrets are not listed"
    );

    let server = Server::start(&db.url, FAST_RETRIES).await;
    let write_key = shop["write_key"].as_str().unwrap();
    let sent = events(0, 60);
    post(&server, write_key, &sent).await;
    // The same batches again: duplicates, nothing new to deliver.
    post(&server, write_key, &sent).await;

    let checkouts: HashSet<String> = ids(&sent
        .iter()
        .filter(|e| e["name"] == "Checkout Completed")
        .cloned()
        .collect::<Vec<_>>());
    wait_until("every event delivered", || {
        receiver.delivered("/all") == ids(&sent) && receiver.delivered("/checkouts") == checkouts
    })
    .await;
    wait_for_status(&db.url, &all_id, "the queue to drain", |s| {
        s["pending"] == 0 && s["in_flight"] == 0
    })
    .await;

    let hits = receiver.hits();
    assert!(hits.iter().all(|h| h.signed), "every request is signed");
    assert!(hits
        .iter()
        .all(|h| h.project == "shop" && h.signatures == 1));
    let mut by_id: HashMap<&str, Vec<&Hit>> = HashMap::new();
    for h in &hits {
        by_id.entry(&h.id).or_default().push(h);
    }
    for (id, attempts) in &by_id {
        assert!(id.starts_with("msg_"));
        let statuses: Vec<u16> = attempts.iter().map(|h| h.status).collect();
        assert_eq!(statuses, [500, 500, 429, 204], "{id}");
        // The same events on every attempt of one delivery.
        assert!(attempts.iter().all(|h| h.events == attempts[0].events));
        // Retry-After: 1 was honoured (the schedule alone would retry after ~200 ms).
        assert!(attempts[3].arrived - attempts[2].arrived >= Duration::from_millis(900));
    }
    // Each event in exactly one delivery per destination; groups of at most the batch size.
    let delivered: Vec<&&Hit> = by_id.values().map(|a| &a[3]).collect::<Vec<_>>();
    for path in ["/all", "/checkouts"] {
        let events: Vec<&String> = delivered
            .iter()
            .filter(|h| h.path == path)
            .flat_map(|h| &h.events)
            .collect();
        assert_eq!(
            events.len(),
            events.iter().collect::<HashSet<_>>().len(),
            "{path}"
        );
    }
    assert!(delivered
        .iter()
        .filter(|h| h.path == "/checkouts")
        .all(|h| h.events.len() <= 4 && h.names.iter().all(|n| n == "Checkout Completed")));

    let s = status(&db.url, &all_id);
    assert_eq!(s["failed"], 0);
    assert!(s["delivered"].as_i64().unwrap() >= 1);
    assert_eq!(
        s["delivered"].as_i64().unwrap() as usize,
        delivered.iter().filter(|h| h.path == "/all").count()
    );
    assert!(
        s["last_error"].as_str().unwrap().starts_with("HTTP 429"),
        "{s}"
    );
    assert!(s["last_error_at"].is_string());

    // The same over HTTP with the read key; the write key is refused.
    let client = reqwest::Client::new();
    let read_key = shop["read_key"].as_str().unwrap();
    let answer: serde_json::Value = client
        .get(server.url("/v1/destinations/status"))
        .bearer_auth(read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["destinations"].as_array().unwrap().len(), 2);
    let answer = client
        .get(server.url(&format!("/v1/destinations/status?key={write_key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tracklet_deliveries_total{result=\"delivered\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tracklet_deliveries_total{result=\"retry\"}"));
    assert!(
        metrics.contains("tracklet_deliveries_queue_depth"),
        "{metrics}"
    );
}

#[tokio::test]
async fn kill_9_mid_delivery_misses_nothing_and_repeats_only_the_same_webhook_id() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    let receiver = Receiver::start(always(200), Duration::from_millis(300)).await;
    let (id, secret) = add_destination(
        &db.url,
        "shop",
        &receiver.url("/hook"),
        &["--batch-size", "10"],
    );
    receiver.expect_keys("/hook", &[&secret]);
    let args = [
        "--allow-private-destinations",
        "--webhook-timeout",
        "1s",
        "--webhook-lease",
        "2s",
        "--webhook-poll",
        "50ms",
    ];
    let mut server = Server::start(&db.url, &args).await;
    let sent = events(0, 200);
    post(&server, shop["write_key"].as_str().unwrap(), &sent).await;
    wait_until("deliveries in flight", || {
        let s = receiver.state.lock().unwrap();
        s.in_flight_now > 0 && !s.hits.is_empty()
    })
    .await;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let _restarted = Server::start(&db.url, &args).await;
    wait_until("every event delivered after the restart", || {
        receiver.delivered("/hook") == ids(&sent)
    })
    .await;
    wait_for_status(&db.url, &id, "the queue to drain", |s| {
        s["pending"] == 0 && s["in_flight"] == 0
    })
    .await;
    let hits = receiver.hits();
    assert!(hits.iter().all(|h| h.signed));
    // An event travels in one delivery only: a repeat is the same webhook-id.
    let mut carriers: HashMap<String, HashSet<String>> = HashMap::new();
    for h in &hits {
        for e in &h.events {
            carriers.entry(e.clone()).or_default().insert(h.id.clone());
        }
    }
    assert_eq!(carriers.len(), 200);
    assert!(carriers.values().all(|ids| ids.len() == 1), "{carriers:?}");
    // Eight commits of 25 events, in groups of at most 10: 24 deliveries.
    assert_eq!(status(&db.url, &id)["delivered"], 24);
}

#[tokio::test]
async fn two_collectors_never_send_one_delivery_twice_at_once() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    let receiver = Receiver::start(always(200), Duration::from_millis(100)).await;
    let (id, secret) = add_destination(
        &db.url,
        "shop",
        &receiver.url("/hook"),
        &["--batch-size", "5"],
    );
    receiver.expect_keys("/hook", &[&secret]);
    let args = [
        "--allow-private-destinations",
        "--webhook-concurrency",
        "2",
        "--webhook-poll",
        "20ms",
    ];
    let a = Server::start(&db.url, &args).await;
    let b = Server::start(&db.url, &args).await;
    let sent = events(0, 150);
    let (first, second) = sent.split_at(75);
    let write_key = shop["write_key"].as_str().unwrap();
    tokio::join!(post(&a, write_key, first), post(&b, write_key, second));
    wait_until("every event delivered", || {
        receiver.delivered("/hook") == ids(&sent)
    })
    .await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 30, "each of the 30 deliveries sent once");
    assert_eq!(hits.iter().map(|h| &h.id).collect::<HashSet<_>>().len(), 30);
    let s = receiver.state.lock().unwrap();
    assert!(!s.overlapped);
    assert!(
        s.max_in_flight <= 2,
        "per-destination cap: {}",
        s.max_in_flight
    );
    drop(s);
    assert_eq!(status(&db.url, &id)["delivered"], 30);
}

#[tokio::test]
async fn gone_disables_the_destination_and_replay_sends_again() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    let receiver = Receiver::start(always(410), Duration::ZERO).await;
    let (id, secret) = add_destination(&db.url, "shop", &receiver.url("/hook"), &[]);
    receiver.expect_keys("/hook", &[&secret]);
    let server = Server::start(&db.url, FAST_RETRIES).await;
    let write_key = shop["write_key"].as_str().unwrap();
    let first = events(0, 10);
    post(&server, write_key, &first).await;
    wait_for_status(&db.url, &id, "the 410 to disable it", |s| {
        s["enabled"] == false && s["failed"] == 1
    })
    .await;
    let s = status(&db.url, &id);
    assert!(
        s["disabled_reason"].as_str().unwrap().contains("410"),
        "{s}"
    );
    assert_eq!(receiver.hits().len(), 1, "a 410 is not retried");
    // Disabled: later events are not queued for it.
    post(&server, write_key, &events(10, 10)).await;
    let s = status(&db.url, &id);
    assert_eq!(
        (s["pending"].as_i64(), s["in_flight"].as_i64()),
        (Some(0), Some(0))
    );

    // The receiver is back: enable and replay the failed delivery (same webhook-id).
    receiver.set_plan(always(200));
    let (ok, _, err) = cli(&db.url, &["destinations", "enable", &id]);
    assert!(ok, "{err}");
    let replayed = cli_json(&db.url, &["destinations", "replay", &id]);
    assert_eq!(replayed["requeued"], 1);
    wait_until("the replay", || receiver.delivered("/hook") == ids(&first)).await;
    let hits = receiver.hits();
    assert_eq!(hits[0].id, hits[1].id);
    assert!(hits.iter().all(|h| h.signed));
    let s = status(&db.url, &id);
    assert_eq!(
        (s["delivered"].as_i64(), s["failed"].as_i64()),
        (Some(1), Some(0))
    );
    let (ok, _, err) = cli(&db.url, &["destinations", "remove", &id]);
    assert!(ok, "{err}");
    assert_eq!(
        cli_json(&db.url, &["destinations", "list"]),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn private_destinations_are_refused_without_the_flag() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    let receiver = Receiver::start(always(200), Duration::ZERO).await;
    for url in [
        receiver.url("/hook"),
        "http://localhost:9/x".into(),
        "http://10.0.0.1/x".into(),
    ] {
        let (ok, _, err) = cli(
            &db.url,
            &["destinations", "add", "--project", "shop", "--url", &url],
        );
        assert!(!ok, "{url} refused");
        assert!(err.contains("private"), "{err}");
    }
    let (ok, _, err) = cli(
        &db.url,
        &[
            "destinations",
            "add",
            "--project",
            "shop",
            "--url",
            "ftp://example.com/",
        ],
    );
    assert!(!ok && err.contains("http"), "{err}");
    assert_eq!(
        cli_json(&db.url, &["destinations", "list"]),
        serde_json::json!([])
    );

    // Added with the flag, then delivered by a collector without it: refused at delivery.
    let (id, _) = add_destination(&db.url, "shop", &receiver.url("/hook"), &[]);
    let server = Server::start(
        &db.url,
        &[
            "--webhook-retry-schedule",
            "100ms",
            "--webhook-poll",
            "50ms",
        ],
    )
    .await;
    post(&server, shop["write_key"].as_str().unwrap(), &events(0, 3)).await;
    wait_for_status(&db.url, &id, "the delivery to fail", |s| s["failed"] == 1).await;
    assert!(status(&db.url, &id)["last_error"]
        .as_str()
        .unwrap()
        .contains("private"));
    assert!(
        receiver.hits().is_empty(),
        "nothing sent to a private address"
    );
}

#[tokio::test]
async fn sqlite_delivers_and_signs_with_both_secrets_during_a_rotation() {
    let dir = std::env::temp_dir().join(format!("tracklet-hooks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite:{}", dir.join("events.sqlite3").display());
    let shop = add_project_cli(&db, "shop");
    let receiver = Receiver::start(
        Arc::new(|_, attempt| {
            if attempt == 1 {
                (503, Some(0))
            } else {
                (200, None)
            }
        }),
        Duration::ZERO,
    )
    .await;
    let (id, old) = add_destination(&db, "shop", &receiver.url("/hook"), &[]);
    let rotated = cli_json(&db, &["destinations", "rotate-secret", &id]);
    let new = rotated["secret"].as_str().unwrap();
    assert_ne!(new, old);
    receiver.expect_keys("/hook", &[new, &old]);
    let server = Server::start(&db, FAST_RETRIES).await;
    let sent = events(0, 30);
    post(&server, shop["write_key"].as_str().unwrap(), &sent).await;
    wait_until("every event delivered", || {
        receiver.delivered("/hook") == ids(&sent)
    })
    .await;
    // Two commits (25 and 5 events): two deliveries, each answered 503 then 200.
    let hits = receiver.hits();
    let mut statuses: HashMap<&str, Vec<u16>> = HashMap::new();
    for h in &hits {
        statuses.entry(&h.id).or_default().push(h.status);
    }
    assert_eq!(statuses.len(), 2);
    assert!(statuses.values().all(|s| s == &[503, 200]), "{statuses:?}");
    assert!(hits.iter().all(|h| h.signed && h.signatures == 2));
    wait_for_status(&db, &id, "delivered", |s| s["delivered"] == 2).await;
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// Webhook workers yield to ingest while it is saturated (`--webhook-busy-in-flight`):
/// the signal is high only while commits wait for a transaction slot, and for a second
/// after.
#[tokio::test]
async fn ingest_pressure_is_high_only_while_commits_wait_for_a_slot() {
    use tracklet_collector::commit::{GroupCommitter, IngestPressure};
    use tracklet_collector::config::CommitConfig;
    use tracklet_collector::store::BatchReceipt;

    let app = app(Backend::Sqlite).await;
    // One transaction at a time, one job per transaction: the rest wait.
    let config = CommitConfig {
        max_rows: 1,
        concurrency: 1,
        ..CommitConfig::default()
    };
    let (committer, task) = GroupCommitter::start(app.store.clone(), config);
    let pressure = committer.pressure();
    let receipt = |n: usize| BatchReceipt {
        project_id: app.project.id,
        batch_id: format!("pressure-{n}"),
        received_at: chrono::Utc::now(),
    };
    // Commits one after the other never wait for a slot.
    for n in 0..5 {
        committer
            .commit(Vec::new(), Some(receipt(n)))
            .await
            .unwrap();
    }
    assert!(!pressure.high(), "sequential commits are not pressure");
    // Forty at once: all but the first wait.
    let commits: Vec<_> = (5..45)
        .map(|n| {
            let committer = committer.clone();
            let receipt = receipt(n);
            tokio::spawn(async move { committer.commit(Vec::new(), Some(receipt)).await })
        })
        .collect();
    for commit in commits {
        commit.await.unwrap().unwrap();
    }
    assert!(pressure.high(), "forty concurrent commits through one slot");
    tokio::time::sleep(IngestPressure::MEMORY + Duration::from_millis(100)).await;
    assert!(
        !pressure.high(),
        "the pressure ends a second after the last wait"
    );
    drop(committer);
    task.await.unwrap();
}

/// While ingest is saturated a worker starts one delivery per poll interval; once it is not,
/// the rest go out at once. (The worker runs in the test, its pressure driven by the test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_trickle_while_ingest_is_saturated_and_catch_up_after() {
    use tracklet_collector::commit::IngestPressure;
    use tracklet_collector::shutdown::Shutdown;
    use tracklet_collector::webhooks::{worker, WebhookConfig};

    let app = app(Backend::Postgres).await;
    let db = &app.db.as_ref().unwrap().url;
    let receiver = Receiver::start(always(204), Duration::ZERO).await;
    add_destination(
        db,
        &app.project.name,
        &receiver.url("/p"),
        &["--batch-size", "1"],
    );
    // 40 events: 40 deliveries of one event each.
    let sent = events(0, 40);
    let answer = app
        .send(
            axum::http::Request::post(app.batch_uri())
                .header("origin", ORIGIN)
                .body(axum::body::Body::from(batch(SENT, sent.clone())))
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);

    let pressure = IngestPressure::new();
    let saturated = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let marking = {
        let (pressure, saturated) = (pressure.clone(), saturated.clone());
        tokio::spawn(async move {
            while saturated.load(std::sync::atomic::Ordering::Relaxed) {
                pressure.mark_full();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let config = WebhookConfig {
        poll_interval: Duration::from_millis(100),
        allow_private: true,
        ..WebhookConfig::default()
    };
    let shutdown = Shutdown::new();
    let deliveries = app
        .store
        .deliveries()
        .expect("Postgres has a delivery queue");
    let running = tokio::spawn(worker::run(deliveries, config, pressure, shutdown.clone()));

    // One second saturated: about ten deliveries (one per 100 ms), not forty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let trickled = receiver.hits().len();
    assert!(
        (1..=12).contains(&trickled),
        "{trickled} deliveries in a saturated second"
    );
    saturated.store(false, std::sync::atomic::Ordering::Relaxed);
    marking.await.unwrap();
    wait_until("every event delivered after the saturation", || {
        receiver.delivered("/p") == ids(&sent)
    })
    .await;
    shutdown.trigger();
    running.await.unwrap();
}
