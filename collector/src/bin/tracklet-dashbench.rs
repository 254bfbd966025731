//! Dashboard benchmark (`cargo xtask bench dashboard`; 127.0.0.1 only).
//!
//! Creates a scratch Postgres database, generates `--events` events for one project over
//! `--days` days with a SQL `generate_series` (sessions of one to nine events, `--visitors`
//! visitors, 50 pages, 30 referrers, a few browsers, systems, devices and countries), fills
//! the rollups with [`rollup::rebuild`] (the drain's SQL, a day at a time), starts the
//! real `tracklet-collector` binary on it and times every call the dashboard's default view
//! (the last 30 days) makes, with and without a filter: `--runs` times each after one
//! warm-up, p50 and p95; with `--page-script`, the time until the dashboard page has drawn
//! the default view in headless Chromium. Prints a markdown table; drops the database at the
//! end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{Duration as Days, Utc};
use clap::Parser;
use sqlx::Connection;
use tracklet_collector::rollup;
use tracklet_collector::store::postgres::PgStore;
use tracklet_collector::store::{EventStore, Project};

#[derive(Debug, Parser)]
#[command(
    name = "tracklet-dashbench",
    about = "Dashboard query benchmark for tracklet-collector (127.0.0.1 only)."
)]
struct Args {
    /// Postgres server to benchmark against (a scratch database is created and dropped on it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Events to generate (about: whole sessions are generated).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Days the events spread over, ending now.
    #[arg(long, default_value_t = 90)]
    days: i64,
    #[arg(long, default_value_t = 200_000)]
    visitors: u64,
    /// Timed runs of each call (after one warm-up).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Timed runs of each call with a filter (most read raw events: seconds each).
    #[arg(long, default_value_t = 5)]
    filtered_runs: usize,
    /// `tests/bench/dashboard.mjs`: measure "page interactive" with it (Node, playwright-core
    /// and Chromium at `CHROMIUM_PATH`); without it that figure is not measured.
    #[arg(long)]
    page_script: Option<PathBuf>,
    /// Page loads timed by `--page-script`.
    #[arg(long, default_value_t = 10)]
    page_runs: usize,
    /// The collector binary (default: `tracklet-collector` next to this executable).
    #[arg(long)]
    collector_bin: Option<PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.database_url.contains("127.0.0.1") || args.database_url.contains("localhost"),
        "the benchmark only talks to a local Postgres (127.0.0.1)"
    );
    anyhow::ensure!(
        (1..=400).contains(&args.days) && args.visitors >= 1 && (1..=1000).contains(&args.runs),
        "--days must be 1..=400, --visitors at least 1, --runs 1..=1000"
    );
    let mut admin = sqlx::PgConnection::connect(&args.database_url)
        .await
        .context("Postgres is required: start it on 127.0.0.1:5432, or set DATABASE_URL")?;
    let db_name = format!("tracklet_dashbench_{}", uuid::Uuid::new_v4().simple());
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

/// The collector process; SIGTERM when dropped, SIGKILL after 10 s.
struct Collector {
    child: Child,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_collector(args: &Args, url: &str) -> anyhow::Result<(Collector, SocketAddr)> {
    let bin = match &args.collector_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("tracklet-collector"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --profile server -p tracklet-collector --bins` (or pass --collector-bin)",
            bin.display()
        );
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Command::new(&bin)
        .arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .env("DATABASE_URL", url)
        .env("TRACKLET_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    println!(
        "collector: {} (pid {}) on {addr}",
        bin.display(),
        child.id()
    );
    Ok((Collector { child }, addr))
}

/// Inserts the sessions numbered `[first, last)`: one statement, generated in Postgres.
/// Per session: a visitor (`$5` of them, their browser, system, device and country follow
/// from the visitor), a start in the last `$4` days, one to nine events a minute or two
/// apart (skewed to short sessions: a third are bounces), a referrer on the first event
/// (40 % direct) and UTM source, medium and campaign on the landing page's URL of a quarter
/// of the sessions, pages and custom events skewed towards the first of each list.
const GENERATE: &str = "\
INSERT INTO events (project_id, id, ts, name, anonymous_id, session_id, context, sent_at, \
    received_at, time, browser, os, device_type, country) \
SELECT $1, gen_random_uuid(), t, name, 'v' || v, 's' || k, context, t, t, t, \
    (ARRAY['Chrome','Chrome','Chrome','Safari','Safari','Firefox','Edge','Samsung Internet'])[1 + v % 8], \
    (ARRAY['Windows 10','Windows 10','macOS','iOS','iOS','Android','Android','Linux'])[1 + (v / 8) % 8], \
    (ARRAY['desktop','desktop','desktop','mobile','mobile','tablet'])[1 + (v / 64) % 6], \
    (ARRAY['US','US','US','DE','DE','GB','FR','IN','BR','JP','CA','NL','SE','ES','NZ'])[1 + (v / 384) % 15] \
FROM ( \
    SELECT k, floor(random() * $5)::int8 AS v, \
        now() - random() * $4 * interval '1 day' AS start, \
        1 + floor(random() ^ 2 * 9)::int AS size, \
        CASE WHEN random() < 0.4 THEN '' ELSE 'https://' || \
            (ARRAY['www.google.com','www.bing.com','duckduckgo.com','news.ycombinator.com', \
            't.co','www.reddit.com','www.facebook.com','github.com','www.linkedin.com', \
            'lobste.rs','search.yahoo.com','www.ecosia.org','yandex.ru','m.facebook.com', \
            'l.instagram.com','www.youtube.com','dev.to','medium.com','stackoverflow.com', \
            'www.producthunt.com','slack.com','discord.com','mail.google.com', \
            'outlook.live.com','substack.com','www.baidu.com','www.qwant.com', \
            'search.brave.com','kagi.com','example.org'])[1 + floor(random() ^ 2 * 30)::int] \
            || '/' END AS referrer, \
        CASE WHEN random() < 0.25 THEN \
            '?utm_source=' || (ARRAY['newsletter','google','facebook','twitter','partner'])[1 + floor(random() ^ 2 * 5)::int] \
            || '&utm_medium=' || (ARRAY['email','cpc','social'])[1 + floor(random() * 3)::int] \
            || '&utm_campaign=campaign-' || floor(random() ^ 2 * 12)::int \
            ELSE '' END AS utm \
    FROM generate_series($2::int8, $3::int8 - 1) AS k) AS s, \
LATERAL ( \
    SELECT start + (j * 75 + floor(random() * 30)) * interval '1 second' AS t, \
        CASE WHEN j > 0 AND random() < 0.15 THEN \
            (ARRAY['signup','Song Played','Add To Cart','Download','Search'])[1 + floor(random() ^ 2 * 5)::int] \
            ELSE 'page_view' END AS name, \
        jsonb_strip_nulls(jsonb_build_object( \
            'path', path, \
            'url', 'https://example.com' || path || CASE WHEN j = 0 THEN utm ELSE '' END, \
            'referrer', CASE WHEN j = 0 THEN referrer END)) AS context \
    FROM generate_series(0, size - 1) AS j, \
    LATERAL (SELECT CASE WHEN j = 0 AND random() < 0.3 THEN '/' \
        ELSE '/page-' || floor(random() ^ 2 * 50)::int END AS path) AS p) AS e";

/// Mean session length of [`GENERATE`]: 1 + 9 * E[u^2] (then floored) is about 3.5.
const EVENTS_PER_SESSION: f64 = 3.5;

async fn bench(args: &Args, url: &str) -> anyhow::Result<()> {
    let store = PgStore::connect(url, 2).await?;
    store.migrate().await?;
    let now = Utc::now();
    for back in (0..=args.days + 31).rev().step_by(28) {
        store
            .maintain_partitions(now - Days::days(back), 1, 0)
            .await?;
    }
    let project = Project::new("dashbench", vec![], Some(0));
    store.add_project(&project).await?;
    let pool = store.pool().clone();
    let installed: bool = sqlx::query_scalar("SELECT to_regclass('rollup_hourly') IS NOT NULL")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        installed,
        "no rollups in the scratch database: install the hll extension (apt-get install postgresql-15-hll)"
    );

    // Generate, in statements of about a million events.
    let sessions = (args.events as f64 / EVENTS_PER_SESSION).ceil() as i64;
    let step = (1_000_000.0 / EVENTS_PER_SESSION) as i64;
    let started = Instant::now();
    let mut first = 0;
    while first < sessions {
        let last = (first + step).min(sessions);
        sqlx::query(GENERATE)
            .bind(project.id)
            .bind(first)
            .bind(last)
            .bind(args.days as f64)
            .bind(args.visitors as f64)
            .execute(&pool)
            .await?;
        first = last;
        print!(".");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    let generated: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    let generate_secs = started.elapsed().as_secs_f64();
    println!("\ngenerated {generated} events in {sessions} sessions in {generate_secs:.0} s");

    let started = Instant::now();
    let counted = rollup::rebuild(&pool, Some(project.id)).await?;
    sqlx::query(
        "VACUUM ANALYZE events, rollup_hourly, rollup_sessions, rollup_session_hours, \
         rollup_session_ends",
    )
    .execute(&pool)
    .await?;
    let rollup_secs = started.elapsed().as_secs_f64();
    let (hourly, session_rows, session_hours, session_ends): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rollup_hourly), (SELECT count(*) FROM rollup_sessions), \
                 (SELECT count(*) FROM rollup_session_hours), \
                 (SELECT count(*) FROM rollup_session_ends)",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "rollups: {counted} events counted into {hourly} hourly rows, {session_rows} sessions, {session_hours} session hours and {session_ends} entry/exit rows in {rollup_secs:.0} s (with VACUUM ANALYZE)"
    );
    // The most viewed page, for the filtered calls.
    let top_page: String = sqlx::query_scalar(
        "SELECT key FROM rollup_hourly WHERE dim = 1 GROUP BY key ORDER BY sum(events) DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;

    let (collector, addr) = start_collector(args, url)?;
    wait_until_up(addr).await?;
    // The dashboard's default view: the last 30 days, whole UTC days, today included.
    let today = now.date_naive();
    let from = (today - Days::days(29)).to_string();
    let to = (today + Days::days(1)).to_string();
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut calls: Vec<(String, String)> = Vec::new();
    for filter in [String::new(), format!("&page={}", urlencode(&top_page))] {
        let mut add = |path: &str, extra: &str| {
            calls.push((
                format!("{path}{extra}{filter}"),
                format!("{base}{path}?from={from}&to={to}{extra}{filter}"),
            ))
        };
        add("/v1/stats/summary", "");
        add("/v1/stats/timeseries", "");
        for by in [
            "page",
            "entry_page",
            "exit_page",
            "referrer",
            "browser",
            "os",
            "device",
            "country",
            "event",
            "utm_source",
            "utm_medium",
            "utm_campaign",
        ] {
            add("/v1/stats/breakdown", &format!("&by={by}"));
        }
        if filter.is_empty() {
            // The page asks for the ingest health too (not filtered).
            add("/v1/stats/health", "");
        }
    }

    println!();
    println!(
        "{generated} events, {} visitors, {} days; range {from} to {to} (30 days); {} runs each ({} with the filter) after a warm-up",
        args.visitors, args.days, args.runs, args.filtered_runs
    );
    println!();
    println!("| call | p50 | p95 | max | answered from |");
    println!("|---|---|---|---|---|");
    for (name, url) in &calls {
        let filtered = name.contains("&page=");
        let runs = if filtered {
            args.filtered_runs
        } else {
            args.runs
        };
        let (status, _) = timed_get(&client, url, &project.read_key).await?;
        let mut times = Vec::with_capacity(runs);
        let mut failed = 0;
        for _ in 0..runs {
            let (status, took) = timed_get(&client, url, &project.read_key).await?;
            if status != 200 {
                failed += 1;
            }
            times.push(took);
        }
        times.sort();
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let source = source_of(name);
        let failures = if failed > 0 || status != 200 {
            format!(" ({failed} of {runs} not 200; warm-up {status})")
        } else {
            String::new()
        };
        println!(
            "| `{name}` | {:.1} ms | {:.1} ms | {:.1} ms | {source}{failures} |",
            pct(0.5),
            pct(0.95),
            pct(1.0)
        );
    }
    println!();
    match &args.page_script {
        Some(script) => println!(
            "{}",
            page_interactive(script, &base, &project.read_key, args.page_runs)
        ),
        None => println!("page interactive: not measured (no --page-script)"),
    }
    drop(collector);
    Ok(())
}

/// Runs the page script (see `--page-script`); its one-line answer, or why there is none.
fn page_interactive(script: &std::path::Path, origin: &str, key: &str, runs: usize) -> String {
    let output = Command::new("node")
        .arg(script)
        .args([origin, key, &runs.to_string()])
        .stdin(Stdio::null())
        .output();
    match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let reason = stderr
                .lines()
                .find(|l| l.contains("Error"))
                .unwrap_or("failed");
            format!("page interactive: not measured ({})", reason.trim())
        }
        Err(e) => format!("page interactive: not measured (node: {e})"),
    }
}

/// Which statement answers a call (mirrors `rollup::*_sql`): for the table.
fn source_of(call: &str) -> &'static str {
    if call.contains("/health") {
        return "ingest health counters";
    }
    let filtered = call.contains("&page=");
    let by = call
        .split("by=")
        .nth(1)
        .map(|b| b.split('&').next().unwrap_or(b));
    match (call.contains("summary"), call.contains("timeseries"), by) {
        (true, _, _) if !filtered => "rollups",
        (_, true, _) => "rollups",
        (_, _, Some("entry_page" | "exit_page")) if filtered => "raw events",
        (_, _, Some("page")) => "rollups",
        (_, _, Some(_)) if !filtered => "rollups",
        _ => "raw events",
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn timed_get(
    client: &reqwest::Client,
    url: &str,
    key: &str,
) -> anyhow::Result<(u16, Duration)> {
    let started = Instant::now();
    let r = client.get(url).bearer_auth(key).send().await?;
    let status = r.status().as_u16();
    let _ = r.bytes().await?;
    Ok((status, started.elapsed()))
}

async fn wait_until_up(addr: SocketAddr) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/healthz");
    for _ in 0..100 {
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the collector did not come up on {addr} within 10 s")
}
