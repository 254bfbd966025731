//! Load benchmark for the collector (127.0.0.1 only, bounded in time and requests).
//!
//! Creates a scratch Postgres database, runs a collector in-process on 127.0.0.1, has many
//! concurrent clients post gzipped batches of 20 events for a fixed time, and reports events
//! committed per second and request latency; then measures the raw ceiling: the same rows
//! written with `COPY` in large batches into a table with the same columns and primary key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sqlx::Connection;
use tracklet_collector::config::ServeConfig;
use tracklet_collector::http::{router, AppState};
use tracklet_collector::store::postgres::PgStore;
use tracklet_collector::store::{EventStore, Project};

#[derive(Debug, Parser)]
#[command(
    name = "tracklet-loadgen",
    about = "Load benchmark for tracklet-collector (127.0.0.1 only)."
)]
struct Args {
    /// Postgres server to benchmark against (a scratch database is created and dropped on it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Events per batch.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Upper bound on requests per client.
    #[arg(long, default_value_t = 100_000)]
    max_requests_per_client: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.database_url.contains("127.0.0.1") || args.database_url.contains("localhost"),
        "the benchmark only talks to a local Postgres (127.0.0.1)"
    );
    let mut admin = sqlx::PgConnection::connect(&args.database_url)
        .await
        .context("Postgres is required: start it on 127.0.0.1:5432, or set DATABASE_URL")?;
    let db_name = format!("tracklet_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&mut admin)
        .await?;
    let base = args
        .database_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(&args.database_url);
    let url = format!("{base}/{db_name}");
    let result = bench(&args, &url).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    result
}

async fn bench(args: &Args, url: &str) -> anyhow::Result<()> {
    let store = Arc::new(PgStore::connect(url, 10).await?);
    store.migrate().await?;
    store.maintain_partitions(chrono::Utc::now(), 1, 0).await?;
    let project = Project::new("bench", vec![], None);
    store.add_project(&project).await?;
    let (state, committer) = AppState::new(ServeConfig::default(), store.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    println!(
        "load: {} clients, batches of {} events, {} s, collector on {addr} (Postgres)",
        args.clients, args.batch, args.duration_secs
    );
    let batch_url = format!("http://{addr}/v1/batch?key={}", project.write_key);
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_no in 0..args.clients {
        let (url, batch, max) = (batch_url.clone(), args.batch, args.max_requests_per_client);
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::new();
            let (mut accepted, mut failed) = (0u64, 0u64);
            for request_no in 0..max {
                if Instant::now() >= deadline {
                    break;
                }
                let body = gzip_batch(client_no, request_no, batch);
                let sent = Instant::now();
                match client
                    .post(&url)
                    .header("content-type", "text/plain")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        let answer: serde_json::Value = r.json().await.unwrap_or_default();
                        accepted += answer["accepted"].as_u64().unwrap_or(0);
                        latencies.push(sent.elapsed());
                    }
                    _ => failed += 1,
                }
            }
            (latencies, accepted, failed)
        }));
    }
    let (mut latencies, mut accepted, mut failed) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, a, f) = t.await?;
        latencies.extend(l);
        accepted += a;
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "collector: {accepted} events committed in {elapsed:.1} s = {:.0} events/s ({} requests, {failed} failed); latency p50 {:.1} ms, p99 {:.1} ms",
        accepted as f64 / elapsed,
        latencies.len(),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
    );
    server.abort();
    drop(committer);

    // Raw ceiling: COPY the same number of rows into a table of the same columns and key.
    let rows = accepted.max(100_000);
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query("CREATE TABLE events_copy (LIKE events INCLUDING DEFAULTS, PRIMARY KEY (project_id, id, ts))")
        .execute(&mut conn)
        .await?;
    let copy_started = Instant::now();
    let mut written = 0u64;
    while written < rows {
        let n = (rows - written).min(50_000);
        let mut csv = String::with_capacity(n as usize * 300);
        for i in written..written + n {
            csv.push_str(&copy_row(project.id, i));
        }
        let mut copy = conn
            .copy_in_raw("COPY events_copy (project_id, id, ts, name, anonymous_id, session_id, props, context, sent_at, received_at, time, browser, os, device_type, is_bot, ip) FROM STDIN (FORMAT csv)")
            .await?;
        copy.send(csv.into_bytes()).await?;
        copy.finish().await?;
        written += n;
    }
    let copy_secs = copy_started.elapsed().as_secs_f64();
    println!(
        "COPY ceiling: {written} rows in {copy_secs:.1} s = {:.0} rows/s (batches of 50000)",
        written as f64 / copy_secs
    );
    conn.close().await?;
    Ok(())
}

fn event_id(n: u64) -> String {
    format!(
        "0190b6f0-{:04x}-7000-8000-{:012x}",
        (n >> 48) & 0xffff,
        n & 0xffff_ffff_ffff
    )
}

fn gzip_batch(client_no: usize, request_no: usize, batch: usize) -> Vec<u8> {
    use std::io::Write;
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let events: Vec<serde_json::Value> = (0..batch)
        .map(|i| {
            let n = ((client_no as u64) << 40) | ((request_no as u64) << 8) | i as u64;
            serde_json::json!({
                "id": event_id(n), "name": "page_view", "ts": now - 500,
                "anonymous_id": format!("anon-{client_no}"), "session_id": format!("sess-{client_no}"),
                "props": {"path": "/products/42", "referrer": "https://search.example/?q=shoes"},
                "context": {"screen": {"w": 1920, "h": 1080}, "locale": "en-GB"},
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({"sent_at": now, "events": events}))
        .unwrap_or_default();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(&body);
    enc.finish().unwrap_or_default()
}

fn copy_row(project: uuid::Uuid, i: u64) -> String {
    let t = chrono::Utc::now().to_rfc3339();
    format!(
        "{project},{},{t},page_view,anon-{},sess-{},\"{{\"\"path\"\": \"\"/products/42\"\"}}\",\"{{\"\"locale\"\": \"\"en-GB\"\"}}\",{t},{t},{t},Chrome,Windows 10,desktop,f,127.0.0.0\n",
        event_id(i),
        i % 1000,
        i % 500
    )
}
