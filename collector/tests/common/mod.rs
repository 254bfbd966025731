//! Shared test fixtures: a fresh Postgres database (or SQLite file) per test, a project, the
//! router driven in-process, and batch builders.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sqlx::Connection;
use tower::ServiceExt;
use tracklet_collector::config::ServeConfig;
use tracklet_collector::http::{router, AppState};
use tracklet_collector::store::postgres::PgStore;
use tracklet_collector::store::sqlite::SqliteStore;
use tracklet_collector::store::{EventStore, Project};

/// Runs one async test body against both backends: `$name::postgres` and `$name::sqlite`
/// (use with `#[macro_use] mod common;`).
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn postgres() {
                ($body)(Backend::Postgres).await
            }
            #[tokio::test]
            async fn sqlite() {
                ($body)(Backend::Sqlite).await
            }
        }
    };
}

pub const PG_REQUIRED: &str =
    "Postgres is required: install postgresql and start it on 127.0.0.1:5432, or set DATABASE_URL";

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database created for one test and dropped (even on panic) when this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("{PG_REQUIRED} (connecting to {admin}: {e})"));
        let name = format!("tracklet_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let _ = conn.close().await;
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin.clone());
        TestDb {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        // Drop may run inside a runtime: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A collector under test: the router, its store, and a project.
pub struct TestApp {
    pub router: Router,
    pub store: Arc<dyn EventStore>,
    pub project: Project,
    pub db: Option<TestDb>,
    pub sqlite_file: Option<PathBuf>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(path) = &self.sqlite_file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

pub const ORIGIN: &str = "https://shop.example";

pub async fn open_store(
    backend: Backend,
) -> (Arc<dyn EventStore>, Option<TestDb>, Option<PathBuf>) {
    match backend {
        Backend::Postgres => {
            let db = TestDb::create().await;
            let store = PgStore::connect(&db.url, 5)
                .await
                .expect("connect to test database");
            store.migrate().await.expect("migrate");
            (Arc::new(store), Some(db), None)
        }
        Backend::Sqlite => {
            let path = std::env::temp_dir().join(format!(
                "tracklet-test-{}.sqlite3",
                uuid::Uuid::new_v4().simple()
            ));
            let store = SqliteStore::open_path(&path).await.expect("open sqlite");
            store.migrate().await.expect("migrate");
            (Arc::new(store), None, Some(path))
        }
    }
}

pub async fn app(backend: Backend) -> TestApp {
    app_with(backend, ServeConfig::default(), None).await
}

pub async fn app_with(backend: Backend, config: ServeConfig, rate_limit: Option<u32>) -> TestApp {
    let (store, db, sqlite_file) = open_store(backend).await;
    let project = Project::new("shop", vec![ORIGIN.to_owned()], rate_limit);
    store.add_project(&project).await.expect("add project");
    let (state, _committer) = AppState::new(config, store.clone()).await.expect("state");
    TestApp {
        router: router(state),
        store,
        project,
        db,
        sqlite_file,
    }
}

/// A valid event with id `0190...<n>`.
pub fn event(n: u64) -> serde_json::Value {
    serde_json::json!({
        "id": format!("0190b6f0-0000-7000-8000-{n:012}"),
        "name": "page_view",
        "ts": 1_763_800_000_000u64 + n,
        "anonymous_id": format!("anon-{}", n % 3),
        "session_id": format!("sess-{}", n % 2),
        "props": {"path": "/", "n": n},
        "context": {"ua_hint": "x"},
    })
}

pub fn batch(sent_at: u64, events: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "sent_at": sent_at, "events": events })).unwrap()
}

/// A batch carrying `batch_id` (any JSON value, to try unusable ones too).
pub fn batch_with_id(
    sent_at: u64,
    batch_id: impl Into<serde_json::Value>,
    events: Vec<serde_json::Value>,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "sent_at": sent_at,
        "batch_id": batch_id.into(),
        "events": events,
    }))
    .unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: serde_json::Value,
    pub text: String,
}

impl TestApp {
    pub fn batch_uri(&self) -> String {
        format!("/v1/batch?key={}", self.project.write_key)
    }

    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router never fails");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            headers,
            json,
            text,
        }
    }

    pub fn status_uri(&self) -> String {
        format!("/v1/batch/status?key={}", self.project.write_key)
    }

    /// POSTs `body` as the SDK does (text/plain, from the allowed origin).
    pub async fn post(&self, body: Vec<u8>) -> Answer {
        self.post_to(&self.batch_uri(), body).await
    }

    /// Asks, as the SDK does, which of `batch_ids` arrived.
    pub async fn status(&self, batch_ids: &[&str]) -> Answer {
        let body = serde_json::json!({ "batch_ids": batch_ids });
        self.post_to(&self.status_uri(), body.to_string().into_bytes())
            .await
    }

    /// POSTs `body` to `uri` as the SDK does (text/plain, from the allowed origin).
    pub async fn post_to(&self, uri: &str, body: Vec<u8>) -> Answer {
        self.send(
            Request::post(uri)
                .header("content-type", "text/plain")
                .header("origin", ORIGIN)
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }

    /// `OPTIONS uri` is answered as a CORS preflight for the allowed origin (204 with the
    /// CORS headers) and refused for another (403 without them).
    pub async fn check_preflight(&self, uri: &str) {
        let preflight = |origin: &str| {
            Request::options(uri)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .body(Body::empty())
                .unwrap()
        };
        let a = self.send(preflight(ORIGIN)).await;
        assert_eq!(a.status, StatusCode::NO_CONTENT, "{uri}");
        assert_eq!(a.headers["access-control-allow-origin"], ORIGIN);
        assert_eq!(
            a.headers["access-control-allow-headers"],
            "Content-Type, Authorization, Content-Encoding"
        );
        let a = self.send(preflight("https://evil.example")).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{uri}");
        assert!(a.headers.get("access-control-allow-origin").is_none());
    }

    /// POSTs every body to the batch endpoint at once, as [`TestApp::post`] does; the
    /// answers in the same order.
    pub async fn post_concurrently(&self, bodies: Vec<Vec<u8>>) -> Vec<Answer> {
        futures_util::future::join_all(bodies.into_iter().map(|body| self.post(body))).await
    }

    /// Runs one SQL statement on the test's database (either backend).
    pub async fn execute(&self, sql: &str) {
        if let Some(db) = &self.db {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
        if let Some(path) = &self.sqlite_file {
            let url = format!("sqlite:{}", path.display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    pub async fn get(&self, uri: &str) -> Answer {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    /// Waits (at most 10 s) until the collector knows `write_key`: projects added while it
    /// runs are seen at its next projects reload (`projects_refresh_interval`).
    pub async fn wait_until_known(&self, write_key: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let a = self
                .send(
                    Request::post(format!("/v1/batch/status?key={write_key}"))
                        .body(Body::from(r#"{"batch_ids":[]}"#))
                        .unwrap(),
                )
                .await;
            if a.status != StatusCode::UNAUTHORIZED {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "key {write_key} still unknown after 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Total events stored for the project (all time).
    pub async fn stored(&self) -> i64 {
        let stats = self
            .store
            .stats(
                self.project.id,
                chrono::DateTime::UNIX_EPOCH,
                chrono::Utc::now() + chrono::Duration::days(1),
            )
            .await
            .unwrap();
        stats.total_events
    }
}

/// The real `tracklet-collector` binary, as built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_tracklet-collector");

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the binary with `args` (no `DATABASE_URL` from the environment): success, stdout,
/// stderr.
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run collector");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `projects add --name NAME --origin ORIGIN` on `database_url`: the project's JSON.
pub fn add_project_cli(database_url: &str, name: &str) -> serde_json::Value {
    let (ok, stdout, stderr) = run_cli(&[
        "projects",
        "add",
        "--database-url",
        database_url,
        "--name",
        name,
        "--origin",
        ORIGIN,
    ]);
    assert!(ok, "projects add: {stderr}");
    serde_json::from_str(&stdout).expect("projects add prints JSON")
}

/// Polls `/healthz` until the server answers (5 s at most).
pub async fn wait_until_up(client: &reqwest::Client, port: u16) -> bool {
    // Generous: on a loaded CI machine a start on a fresh database (migrations, partitions)
    // can take seconds; a process that exits is reported at once by `wait_until_serving`.
    for _ in 0..600 {
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Waits until the collector started by `serve_binary` answers on `port`; if it exits or
/// never answers, the error says so with the end of its log.
pub async fn wait_until_serving(child: &mut std::process::Child, port: u16) -> Result<(), String> {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the collector exited ({status}) before serving:\n{}",
                serve_log_tail(port)
            ));
        }
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(format!(
        "the collector did not answer within 30 s:\n{}",
        serve_log_tail(port)
    ))
}

/// Where `serve_binary` writes the collector's log for `port`.
fn serve_log(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tracklet-test-serve-{port}.log"))
}

/// The last lines of the log of the collector serving on `port`.
pub fn serve_log_tail(port: u16) -> String {
    let log = std::fs::read_to_string(serve_log(port)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `serve` on 127.0.0.1:`port` against `database_url`, with `args` and `env` added; its log
/// goes to a file that `serve_log_tail` reads when a test needs to say why it failed.
pub fn serve_binary(
    database_url: &str,
    port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    std::process::Command::new(BIN)
        .args([
            "serve",
            "--database-url",
            database_url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::File::create(serve_log(port))
                .map(std::process::Stdio::from)
                .unwrap_or_else(|_| std::process::Stdio::null()),
        )
        .spawn()
        .expect("start the collector binary")
}

/// A running collector binary, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub port: u16,
}

impl Server {
    /// Starts `serve` on a free port and waits until it answers.
    pub async fn start(database_url: &str, args: &[&str]) -> Server {
        let port = free_port();
        let child = serve_binary(database_url, port, args, &[]);
        let mut server = Server { child, port };
        if let Err(why) = wait_until_serving(&mut server.child, port).await {
            panic!("{why}");
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc/PID/status")
            * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(serve_log(self.port));
    }
}

// ---- stats API tests (analytics.rs, dashboard_api.rs) ----

/// Posts `events` with `user_agent` (if any) through the batch endpoint.
pub async fn post_as(app: &TestApp, user_agent: Option<&str>, sent_at: u64, events: Vec<Value>) {
    let count = events.len();
    let mut request = Request::post(app.batch_uri())
        .header("content-type", "text/plain")
        .header("origin", ORIGIN);
    if let Some(ua) = user_agent {
        request = request.header("user-agent", ua);
    }
    let a = app
        .send(request.body(Body::from(batch(sent_at, events))).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["accepted"], count, "{}", a.text);
}

/// The last day up to an hour from now (ms since the epoch).
pub fn last_day(sent_at: u64) -> String {
    format!("from={}&to={}", sent_at - 86_400_000, sent_at + 3_600_000)
}

/// GET `path?query` with the read key; asserts 200.
pub async fn get(app: &TestApp, path: &str, query: &str) -> Answer {
    let a = app
        .get(&format!("{path}?key={}&{query}", app.project.read_key))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{path}?{query}: {}", a.text);
    a
}

/// Breakdown rows as `[key, visitors, events]`.
pub async fn breakdown(app: &TestApp, query: &str) -> Value {
    let a = get(app, "/v1/stats/breakdown", query).await;
    a.json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!([r["key"], r["visitors"], r["events"]]))
        .collect()
}
