//! Load benchmark for the collector (127.0.0.1 only, bounded in time and requests).
//!
//! Creates a scratch Postgres database, starts the `tracklet-collector` binary next to this
//! one (`serve` on 127.0.0.1, its own process, so its CPU time and peak memory are its own),
//! and measures:
//!
//! 1. **max**: `--clients` closed-loop clients post gzipped batches of `--batch` events for
//!    `--duration-secs`: events committed per second, request latency p50/p99;
//! 2. **half**: an open-loop phase at a fixed request rate of half the measured maximum,
//!    latency measured from each request's scheduled time (no coordinated omission);
//! 3. **COPY**: the same number of rows written with `COPY` (batches of 50,000) into a table
//!    with the same columns and primary key, as the raw ceiling.
//!
//! With `--webhook`, the project has one webhook destination, a receiver in this process on
//! 127.0.0.1 answering 204 at once: the max phase then measures ingest with the outbox
//! written in every commit, and the run also reports how fast the deliveries drained
//! (deliveries and events per second, from the phase's start to the last delivery).
//!
//! Request bodies are generated and gzipped before each phase (every event id distinct), so
//! the timed windows only send bytes and read answers. The collector's and the load
//! generator's CPU time are read from `/proc`, and the collector's peak RSS from its `VmHWM`.
//! Prints a markdown table at the end.
//!
//! With `--queue nats://127.0.0.1:4222` (`cargo xtask bench queue`) it measures the queue
//! instead (see [`bench_queue`]): the same max phase committed directly, for comparison; one
//! collector acknowledging into JetStream with no sink running; one sink, then two, draining
//! that backlog; half of the collector's rate in open loop with no sink running (its latency);
//! and half of one sink's rate with one sink running, with probes measuring the lag from a
//! collector's 200 to the row in Postgres.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use sqlx::Connection;
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
    /// Concurrent clients in the max-throughput phase.
    #[arg(long, default_value_t = 128)]
    clients: usize,
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Events per batch.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Upper bound on events generated for the max phase (bounds memory and work; the phase
    /// ends early when they are all sent).
    #[arg(long, default_value_t = 3_000_000)]
    max_events: usize,
    /// Skip the half-load phase.
    #[arg(long)]
    no_half_load: bool,
    /// Do not run `CHECKPOINT` before each timed phase. By default each phase starts from a
    /// fresh checkpoint, so the WAL written by the previous phase (or by anything before the
    /// run) cannot trigger a checkpoint inside it; one the phase's own WAL triggers still
    /// happens and is counted.
    #[arg(long)]
    no_checkpoint_first: bool,
    /// The collector binary (default: `tracklet-collector` next to this executable).
    #[arg(long)]
    collector_bin: Option<PathBuf>,
    /// Drop the rollup tables before starting the collector, so it inserts events alone (as
    /// on a server without the hll extension): the ingest cost of the rollups is the
    /// difference between a run with and one without.
    #[arg(long)]
    without_rollups: bool,
    /// Extra arguments for `tracklet-collector serve`, e.g. `--commit-max-rows=4000`.
    #[arg(long, allow_hyphen_values = true, num_args = 1)]
    collector_arg: Vec<String>,
    /// Give the project one webhook destination (a receiver in this process) and report
    /// the delivery rate too. Skips the half-load phase.
    #[arg(long)]
    webhook: bool,
    /// Benchmark the queue (collectors into NATS JetStream, sinks into Postgres) on this
    /// NATS server, e.g. `nats://127.0.0.1:4222`; a scratch stream is created and deleted.
    #[arg(long)]
    queue: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.database_url.contains("127.0.0.1") || args.database_url.contains("localhost"),
        "the benchmark only talks to a local Postgres (127.0.0.1)"
    );
    anyhow::ensure!(
        (1..=1000).contains(&args.batch) && (1..=1024).contains(&args.clients),
        "--batch must be 1..=1000 and --clients 1..=1024"
    );
    anyhow::ensure!(
        (1..=600).contains(&args.duration_secs),
        "--duration-secs must be 1..=600"
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
    let result = match args.queue.as_deref() {
        Some(nats) => bench_queue(&args, &url, nats).await,
        None => bench(&args, &url).await,
    };
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    result
}

/// The collector process; killed when dropped.
struct Collector {
    child: Child,
}

impl Drop for Collector {
    /// SIGTERM (the collector drains and exits), SIGKILL after 10 s.
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

impl Collector {
    fn start(args: &Args, url: &str, extra: &[String]) -> anyhow::Result<(Collector, SocketAddr)> {
        let bin = collector_bin(args)?;
        if !bin.exists() {
            bail!(
                "{} not found: build it with `cargo build --profile server -p tracklet-collector --bins` (or pass --collector-bin)",
                bin.display()
            );
        }
        // A free port on 127.0.0.1 (closed again just before the collector binds it).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            // The webhook receiver of --webhook is on 127.0.0.1.
            .args(args.webhook.then_some("--allow-private-destinations"))
            .args(&args.collector_arg)
            .args(extra)
            .env("DATABASE_URL", url)
            .env("TRACKLET_LOG", "error")
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `sink` on the queue (`queue_args`), its metrics on a free port; stopped when dropped.
    fn sink(args: &Args, url: &str, queue_args: &[String]) -> anyhow::Result<Collector> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(collector_bin(args)?)
            .arg("sink")
            .arg("--listen")
            .arg(addr.to_string())
            .args(queue_args)
            .env("DATABASE_URL", url)
            .env("TRACKLET_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the sink")?;
        Ok(Collector { child })
    }
}

/// The collector binary (`--collector-bin`, else next to this executable).
fn collector_bin(args: &Args) -> anyhow::Result<PathBuf> {
    let bin = match &args.collector_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("tracklet-collector"),
    };
    Ok(bin)
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime is field 14, stime field 15; `fields[0]` is field 3. Linux USER_HZ is 100.
    (ticks(11) + ticks(12)) / 100.0
}

/// Busy CPU seconds of the whole machine (all processes), from `/proc/stat`.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

/// Peak resident memory (`VmHWM`) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU use during a phase (cores): collector, the Postgres backends serving the scratch
/// database, load generator, whole machine (everything, other users included); and the
/// checkpoints Postgres started meanwhile (each brings a burst of full-page writes).
#[derive(Debug, Clone, Copy, Default)]
struct CpuShare {
    collector: f64,
    postgres: f64,
    loadgen: f64,
    machine: f64,
    checkpoints: i64,
}

/// Checkpoints started so far (Postgres 15/16: `pg_stat_bgwriter`; 17+: `pg_stat_checkpointer`).
async fn checkpoints(conn: &mut sqlx::PgConnection) -> i64 {
    for sql in [
        "SELECT (checkpoints_timed + checkpoints_req)::int8 FROM pg_stat_bgwriter",
        "SELECT (num_timed + num_requested)::int8 FROM pg_stat_checkpointer",
    ] {
        if let Ok(n) = sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut *conn)
            .await
        {
            return n;
        }
    }
    0
}

/// What the CPU meter watches: the collector process and the scratch database's backends.
struct Watch<'a> {
    pid: u32,
    conn: &'a mut sqlx::PgConnection,
    db: &'a str,
}

struct CpuMeter {
    pid: String,
    db: String,
    started: Instant,
    collector: f64,
    backends: std::collections::HashMap<i32, f64>,
    loadgen: f64,
    machine: f64,
    checkpoints: i64,
}

/// CPU seconds of each Postgres backend connected to `db` (same machine: `/proc`).
async fn backend_cpu(
    admin: &mut sqlx::PgConnection,
    db: &str,
) -> std::collections::HashMap<i32, f64> {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_all(admin)
        .await
        .unwrap_or_default();
    pids.into_iter()
        .map(|pid| (pid, cpu_secs(&pid.to_string())))
        .collect()
}

impl CpuMeter {
    async fn start(pid: u32, admin: &mut sqlx::PgConnection, db: &str) -> CpuMeter {
        let pid = pid.to_string();
        CpuMeter {
            collector: cpu_secs(&pid),
            backends: backend_cpu(admin, db).await,
            loadgen: cpu_secs("self"),
            machine: machine_busy_secs(),
            checkpoints: checkpoints(admin).await,
            started: Instant::now(),
            db: db.to_owned(),
            pid,
        }
    }

    async fn stop(&self, admin: &mut sqlx::PgConnection) -> CpuShare {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let share = CpuShare {
            collector: (cpu_secs(&self.pid) - self.collector) / secs,
            loadgen: (cpu_secs("self") - self.loadgen) / secs,
            machine: (machine_busy_secs() - self.machine) / secs,
            postgres: 0.0,
            checkpoints: checkpoints(admin).await - self.checkpoints,
        };
        let postgres: f64 = backend_cpu(admin, &self.db)
            .await
            .into_iter()
            .map(|(pid, now)| now - self.backends.get(&pid).copied().unwrap_or(0.0))
            .sum();
        CpuShare {
            postgres: postgres / secs,
            ..share
        }
    }
}

/// What one phase measured.
#[derive(Debug, Default)]
struct PhaseResult {
    elapsed: f64,
    accepted: u64,
    requests: usize,
    failed: u64,
    /// Requests not sent because too many were already waiting (open loop only).
    skipped: u64,
    p50_ms: f64,
    p99_ms: f64,
    cpu: CpuShare,
}

impl PhaseResult {
    fn events_per_sec(&self) -> f64 {
        self.accepted as f64 / self.elapsed.max(1e-9)
    }

    fn finish(&mut self, mut latencies: Vec<Duration>) {
        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or_default()
        };
        self.requests = latencies.len();
        self.p50_ms = pct(0.50);
        self.p99_ms = pct(0.99);
    }
}

/// `CHECKPOINT` before a timed phase (unless `--no-checkpoint-first`): see that flag.
async fn fresh_checkpoint(args: &Args, watch: &mut Watch<'_>) -> anyhow::Result<()> {
    if !args.no_checkpoint_first {
        sqlx::query("CHECKPOINT")
            .execute(&mut *watch.conn)
            .await
            .context("CHECKPOINT (the benchmark's database user must be a superuser; or pass --no-checkpoint-first)")?;
    }
    Ok(())
}

async fn bench(args: &Args, url: &str) -> anyhow::Result<()> {
    let store = PgStore::connect(url, 2).await?;
    store.migrate().await?;
    store.maintain_partitions(chrono::Utc::now(), 1, 0).await?;
    // Unlimited (0), not serve's --rate-limit-default: the benchmark measures the collector.
    let project = Project::new("bench", vec![], Some(0));
    store.add_project(&project).await?;
    if args.without_rollups {
        sqlx::query(
            "DROP TABLE IF EXISTS rollup_hourly, rollup_sessions, rollup_inbox, \
             rollup_session_hours, rollup_session_ends",
        )
        .execute(store.pool())
        .await?;
    }
    let receiver = if args.webhook {
        let receiver = WebhookReceiver::start().await?;
        let destination = tracklet_collector::webhooks::NewDestination {
            id: uuid::Uuid::now_v7(),
            project_id: project.id,
            url: format!("http://{}/hook", receiver.addr),
            events: vec![],
            batch_size: tracklet_collector::webhooks::DEFAULT_BATCH_SIZE,
            secret: tracklet_collector::webhooks::signing::new_secret(),
        };
        tracklet_collector::webhooks::DeliveryStore::add_destination(&store, &destination).await?;
        println!("webhook: one destination, receiver on {}", receiver.addr);
        Some(receiver)
    } else {
        None
    };
    store.pool().close().await;
    println!(
        "rollups: {}",
        if args.without_rollups {
            "off (--without-rollups)"
        } else {
            "on"
        }
    );

    let (collector, addr) = Collector::start(args, url, &[])?;
    wait_until_up(addr).await?;
    let batch_url = format!("http://{addr}/v1/batch?key={}", project.write_key);

    // Phase 1: closed loop, as fast as the collector answers.
    let requests = (args.max_events / args.batch).max(args.clients);
    let bodies = make_bodies(0, requests, args.batch);
    println!(
        "max: {} clients, batches of {} events, {} s ({} distinct bodies ready)",
        args.clients,
        args.batch,
        args.duration_secs,
        bodies.len()
    );
    let db = url.rsplit('/').next().unwrap_or_default();
    let mut probe = sqlx::PgConnection::connect(url).await?;
    let mut watch = Watch {
        pid: collector.pid(),
        conn: &mut probe,
        db,
    };
    fresh_checkpoint(args, &mut watch).await?;
    let max_started = Instant::now();
    let max = closed_loop(args, &batch_url, bodies, &mut watch).await?;
    print_phase("max", &max);
    // The rollups are counted off the commit path (the collector drains `rollup_inbox`):
    // how far behind they were when the phase ended, and how long they took to catch up.
    let rollup_lag = if args.without_rollups {
        None
    } else {
        Some(rollup_catch_up(&mut *watch.conn).await?)
    };
    if let Some((backlog, secs)) = rollup_lag {
        println!(
            "rollups: {backlog} events waiting in the inbox when the max phase ended, counted {secs:.1} s later; max phase with the rollups caught up: {:.0} events/s",
            max.accepted as f64 / (max.elapsed + secs)
        );
    }
    let drained = match &receiver {
        Some(receiver) => Some(receiver.drain(max.accepted, max_started).await),
        None => None,
    };

    // Phase 2: open loop at half of the measured rate.
    let half = if args.no_half_load || args.webhook || max.accepted == 0 {
        None
    } else {
        let rate = max.events_per_sec() / 2.0 / args.batch as f64;
        let n = (rate * args.duration_secs as f64).ceil() as usize;
        let bodies = make_bodies(1, n.max(1), args.batch);
        println!(
            "half: {rate:.0} requests/s open loop for {} s",
            args.duration_secs
        );
        fresh_checkpoint(args, &mut watch).await?;
        let half = open_loop(args, &batch_url, bodies, rate, &mut watch).await?;
        print_phase("half", &half);
        Some(half)
    };
    let peak_rss = peak_rss_mib(collector.pid());
    drop(collector);
    probe.close().await?;

    // Raw ceiling: COPY the same number of rows into a table of the same columns and key.
    let rows = max.accepted.max(100_000);
    let (written, copy_secs) = copy_ceiling(url, project.id, rows).await?;
    let copy_rate = written as f64 / copy_secs;
    println!("COPY ceiling: {written} rows in {copy_secs:.1} s = {copy_rate:.0} rows/s (batches of 50000)");

    println!();
    println!("| phase | events/s | requests (failed) | p50 | p99 | CPU collector / Postgres / loadgen / machine (cores) | checkpoints |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, p: &PhaseResult| {
        println!(
            "| {name} | {:.0} | {} ({}{}) | {:.1} ms | {:.1} ms | {:.2} / {:.2} / {:.2} / {:.2} | {} |",
            p.events_per_sec(),
            p.requests,
            p.failed,
            if p.skipped > 0 {
                format!(", {} skipped", p.skipped)
            } else {
                String::new()
            },
            p.p50_ms,
            p.p99_ms,
            p.cpu.collector,
            p.cpu.postgres,
            p.cpu.loadgen,
            p.cpu.machine,
            p.cpu.checkpoints
        )
    };
    row(
        &format!("max ({} clients, closed loop)", args.clients),
        &max,
    );
    if let Some(half) = &half {
        row("half of max (open loop)", half);
    }
    println!("| `COPY` ceiling (same rows) | {copy_rate:.0} rows/s | — | — | — | — | — |");
    println!();
    if let Some(d) = &drained {
        println!(
            "webhook deliveries: {} deliveries, {} of {} events delivered in {:.1} s from the max phase's start: {:.0} deliveries/s, {:.0} events/s",
            d.deliveries,
            d.events,
            max.accepted,
            d.secs,
            d.deliveries as f64 / d.secs.max(1e-9),
            d.events as f64 / d.secs.max(1e-9)
        );
    }
    println!(
        "collector / COPY: {:.2}; collector peak RSS (VmHWM): {peak_rss:.1} MiB; loadgen CPU share at max: {:.0} % of the machine's busy time",
        max.events_per_sec() / copy_rate,
        100.0 * max.cpu.loadgen / max.cpu.machine.max(1e-9)
    );
    Ok(())
}

/// Events waiting in `rollup_inbox` now, and the seconds until it is empty (at most 120).
async fn rollup_catch_up(conn: &mut sqlx::PgConnection) -> anyhow::Result<(i64, f64)> {
    let started = Instant::now();
    let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM rollup_inbox")
        .fetch_one(&mut *conn)
        .await?;
    while started.elapsed() < Duration::from_secs(120) {
        let waiting: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM rollup_inbox)")
            .fetch_one(&mut *conn)
            .await?;
        if !waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((backlog, started.elapsed().as_secs_f64()))
}

fn print_phase(name: &str, p: &PhaseResult) {
    println!(
        "{name}: {} events committed in {:.1} s = {:.0} events/s ({} requests, {} failed, {} skipped); p50 {:.1} ms, p99 {:.1} ms; CPU cores: collector {:.2}, Postgres backends {:.2}, loadgen {:.2}, machine {:.2}",
        p.accepted,
        p.elapsed,
        p.events_per_sec(),
        p.requests,
        p.failed,
        p.skipped,
        p.p50_ms,
        p.p99_ms,
        p.cpu.collector,
        p.cpu.postgres,
        p.cpu.loadgen,
        p.cpu.machine,
    );
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

/// Sends one body; returns the `accepted` count of a 200 answer.
async fn post(client: &reqwest::Client, url: &str, body: Bytes) -> Option<u64> {
    let r = client
        .post(url)
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    accepted_of(&r.bytes().await.ok()?)
}

/// `accepted` from `{"accepted":N,...}` without building a JSON tree.
fn accepted_of(answer: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"accepted\":";
    let at = answer.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = answer[at..].iter().take_while(|b| b.is_ascii_digit());
    Some(digits.fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

async fn closed_loop(
    args: &Args,
    url: &str,
    bodies: Vec<Bytes>,
    watch: &mut Watch<'_>,
) -> anyhow::Result<PhaseResult> {
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let cpu = CpuMeter::start(watch.pid, watch.conn, watch.db).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (url, bodies, next) = (url.to_owned(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::with_capacity(bodies.len() / 16);
            let (mut accepted, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let Some(body) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let sent = Instant::now();
                match post(&client, &url, body.clone()).await {
                    Some(n) => {
                        accepted += n;
                        latencies.push(sent.elapsed());
                    }
                    None => failed += 1,
                }
            }
            (latencies, accepted, failed)
        }));
    }
    let mut result = PhaseResult::default();
    let mut latencies = Vec::new();
    for t in tasks {
        let (l, a, f) = t.await?;
        latencies.extend(l);
        result.accepted += a;
        result.failed += f;
    }
    result.elapsed = started.elapsed().as_secs_f64();
    result.cpu = cpu.stop(watch.conn).await;
    result.finish(latencies);
    Ok(result)
}

async fn open_loop(
    args: &Args,
    url: &str,
    bodies: Vec<Bytes>,
    requests_per_sec: f64,
    watch: &mut Watch<'_>,
) -> anyhow::Result<PhaseResult> {
    // Enough connections for the rate at a few hundred ms of latency; beyond that many
    // requests waiting, a request is skipped (counted) rather than queued without bound.
    const MAX_WAITING: usize = 512;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_WAITING)
        .build()?;
    let interval = Duration::from_secs_f64(1.0 / requests_per_sec.max(0.1));
    let waiting = Arc::new(AtomicUsize::new(0));
    let cpu = CpuMeter::start(watch.pid, watch.conn, watch.db).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut tasks = Vec::with_capacity(bodies.len());
    let mut result = PhaseResult::default();
    for (i, body) in bodies.into_iter().enumerate() {
        // The schedule is fixed in advance; latency counts from the scheduled instant.
        let due = started + interval.mul_f64(i as f64);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        if waiting.load(Ordering::Relaxed) >= MAX_WAITING {
            result.skipped += 1;
            continue;
        }
        waiting.fetch_add(1, Ordering::Relaxed);
        let (client, url, waiting) = (client.clone(), url.to_owned(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            let answer = post(&client, &url, body).await;
            waiting.fetch_sub(1, Ordering::Relaxed);
            (answer, due.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await? {
            (Some(n), latency) => {
                result.accepted += n;
                latencies.push(latency);
            }
            (None, _) => result.failed += 1,
        }
    }
    result.elapsed = started.elapsed().as_secs_f64();
    result.cpu = cpu.stop(watch.conn).await;
    result.finish(latencies);
    Ok(result)
}

/// `count` gzipped batch bodies, every event id distinct (`phase` keeps phases apart); built
/// on all cores before the timed window starts.
fn make_bodies(phase: u64, count: usize, batch: usize) -> Vec<Bytes> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = count.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let from = t * per_thread;
                    let to = (from + per_thread).min(count);
                    (from..to)
                        .map(|r| gzip_batch(phase, r as u64, batch))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn event_id(n: u64) -> String {
    format!(
        "0190b6f0-{:04x}-7000-8000-{:012x}",
        (n >> 48) & 0xffff,
        n & 0xffff_ffff_ffff
    )
}

fn gzip_batch(phase: u64, request_no: u64, batch: usize) -> Bytes {
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let client = request_no % 1000;
    let mut body = format!("{{\"sent_at\":{now},\"events\":[");
    for i in 0..batch as u64 {
        let n = (phase << 44) | (request_no << 10) | i;
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            "{{\"id\":\"{}\",\"name\":\"page_view\",\"ts\":{},\"anonymous_id\":\"anon-{client}\",\"session_id\":\"sess-{client}\",\"props\":{{\"path\":\"/products/42\",\"referrer\":\"https://search.example/?q=shoes\"}},\"context\":{{\"screen\":{{\"w\":1920,\"h\":1080}},\"locale\":\"en-GB\"}}}}",
            event_id(n),
            now - 500
        ));
    }
    body.push_str("]}");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(body.as_bytes());
    Bytes::from(enc.finish().unwrap_or_default())
}

async fn copy_ceiling(url: &str, project: uuid::Uuid, rows: u64) -> anyhow::Result<(u64, f64)> {
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
            csv.push_str(&copy_row(project, i));
        }
        let mut copy = conn
            .copy_in_raw("COPY events_copy (project_id, id, ts, name, anonymous_id, session_id, props, context, sent_at, received_at, time, browser, os, device_type, is_bot, ip) FROM STDIN (FORMAT csv)")
            .await?;
        copy.send(csv.into_bytes()).await?;
        copy.finish().await?;
        written += n;
    }
    let copy_secs = copy_started.elapsed().as_secs_f64();
    conn.close().await?;
    Ok((written, copy_secs))
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

/// The webhook receiver of `--webhook`: answers 204 at once and counts deliveries and
/// events (by counting the `"anonymous_id"` keys, not parsing: its CPU is the benchmark's).
struct WebhookReceiver {
    addr: SocketAddr,
    counts: Arc<WebhookCounts>,
}

#[derive(Default)]
struct WebhookCounts {
    deliveries: std::sync::atomic::AtomicU64,
    events: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

struct Drained {
    deliveries: u64,
    events: u64,
    secs: f64,
}

impl WebhookReceiver {
    async fn start() -> anyhow::Result<WebhookReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(WebhookCounts::default());
        let state = counts.clone();
        let app = axum::Router::new().fallback(move |body: Bytes| {
            let counts = state.clone();
            async move {
                let events = memchr::memmem::find_iter(&body, b"\"anonymous_id\"").count();
                counts.events.fetch_add(events as u64, Ordering::Relaxed);
                counts.deliveries.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = counts.last.lock() {
                    *last = Some(Instant::now());
                }
                axum::http::StatusCode::NO_CONTENT
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(WebhookReceiver { addr, counts })
    }

    /// Waits until `expected` events arrived, or nothing arrived for 30 s.
    async fn drain(&self, expected: u64, since: Instant) -> Drained {
        let mut seen = (0, Instant::now());
        loop {
            let events = self.counts.events.load(Ordering::Relaxed);
            if events >= expected {
                break;
            }
            if events != seen.0 {
                seen = (events, Instant::now());
            } else if seen.1.elapsed() > Duration::from_secs(30) {
                println!("webhook: no delivery for 30 s, {events} of {expected} events arrived");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last = self
            .counts
            .last
            .lock()
            .ok()
            .and_then(|l| *l)
            .unwrap_or(since);
        Drained {
            deliveries: self.counts.deliveries.load(Ordering::Relaxed),
            events: self.counts.events.load(Ordering::Relaxed),
            secs: last.duration_since(since).as_secs_f64(),
        }
    }
}

/// `--queue`: what the queue adds, on this machine (everything shares its cores: the
/// collector, the sinks, NATS, Postgres and this load generator).
async fn bench_queue(args: &Args, url: &str, nats: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        nats.contains("127.0.0.1") || nats.contains("localhost"),
        "the benchmark only talks to a local NATS (127.0.0.1)"
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats).await.context(
        "NATS with JetStream is required: start it with `nats-server -js -a 127.0.0.1 -p 4222`",
    )?);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stream = format!("TRACKLET_BENCH_{id}");
    let queue_args: Vec<String> = [
        "--queue",
        nats,
        "--queue-stream",
        &stream,
        "--queue-subject-prefix",
        &format!("tracklet_bench.{id}"),
        "--queue-max-mb",
        "16384",
    ]
    .map(str::to_owned)
    .to_vec();
    let result = queue_phases(args, url, &js, &stream, &queue_args).await;
    let _ = js.delete_stream(&stream).await;
    result
}

/// Messages in the stream now (everything not yet committed by a sink).
async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(stream).await?;
    Ok(stream.info().await?.state.messages)
}

/// Waits until the sinks have committed (and acknowledged) everything in the stream; the
/// seconds it took, and the sinks' CPU (cores) meanwhile.
async fn drain(
    js: &async_nats::jetstream::Context,
    stream: &str,
    sinks: &[&Collector],
    watch: &mut Watch<'_>,
) -> anyhow::Result<(f64, CpuShare, f64)> {
    let started = Instant::now();
    let sink_cpu: f64 = sinks.iter().map(|s| cpu_secs(&s.pid().to_string())).sum();
    let cpu = CpuMeter::start(sinks.first().map_or(0, |s| s.pid()), watch.conn, watch.db).await;
    while stream_messages(js, stream).await? > 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the sinks did not drain the stream in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let sinks_cores = (sinks
        .iter()
        .map(|s| cpu_secs(&s.pid().to_string()))
        .sum::<f64>()
        - sink_cpu)
        / secs;
    Ok((secs, cpu.stop(watch.conn).await, sinks_cores))
}

/// CPU seconds of the local `nats-server` process (0 when it is not found).
fn nats_cpu_secs() -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "nats-server")
        })
        .map(|e| cpu_secs(&e.file_name().to_string_lossy()))
        .unwrap_or(0.0)
}

/// End-to-end lag probes: one single-event batch every 100 ms until `until`; each probe's lag
/// runs from the collector's 200 to the moment its row is visible in Postgres (polled every
/// 2 ms, so up to 2 ms late).
async fn probe_lag(
    batch_url: String,
    url: String,
    project: uuid::Uuid,
    until: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let client = reqwest::Client::new();
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let mut lags = Vec::new();
    let mut k = 0u64;
    while Instant::now() < until {
        let next = Instant::now() + Duration::from_millis(100);
        let n = (4 << 44) | k;
        k += 1;
        let now = chrono::Utc::now().timestamp_millis();
        let body = format!(
            "{{\"sent_at\":{now},\"events\":[{{\"id\":\"{}\",\"name\":\"probe\",\"ts\":{now},\"anonymous_id\":\"probe\",\"session_id\":\"probe\"}}]}}",
            event_id(n)
        );
        let id: uuid::Uuid = event_id(n).parse()?;
        if post(&client, &batch_url, Bytes::from(body)).await == Some(1) {
            let acked = Instant::now();
            loop {
                let found: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE project_id = $1 AND id = $2)",
                )
                .bind(project)
                .bind(id)
                .fetch_one(&mut conn)
                .await?;
                if found {
                    lags.push(acked.elapsed());
                    break;
                }
                anyhow::ensure!(acked.elapsed() < Duration::from_secs(120), "probe lost");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        tokio::time::sleep_until(next.into()).await;
    }
    conn.close().await?;
    Ok(lags)
}

async fn queue_phases(
    args: &Args,
    url: &str,
    js: &async_nats::jetstream::Context,
    stream: &str,
    queue_args: &[String],
) -> anyhow::Result<()> {
    let store = PgStore::connect(url, 2).await?;
    store.migrate().await?;
    store.maintain_partitions(chrono::Utc::now(), 1, 0).await?;
    let project = Project::new("bench", vec![], Some(0));
    store.add_project(&project).await?;
    let db = url.rsplit('/').next().unwrap_or_default();
    let mut probe = sqlx::PgConnection::connect(url).await?;
    let requests = (args.max_events / args.batch).max(args.clients);

    // 0. The same max phase committed directly (no queue), for comparison on this run's
    //    machine.
    let (direct_collector, addr) = Collector::start(args, url, &[])?;
    wait_until_up(addr).await?;
    let batch_url = format!("http://{addr}/v1/batch?key={}", project.write_key);
    let mut watch = Watch {
        pid: direct_collector.pid(),
        conn: &mut probe,
        db,
    };
    fresh_checkpoint(args, &mut watch).await?;
    let direct = closed_loop(
        args,
        &batch_url,
        make_bodies(10, requests, args.batch),
        &mut watch,
    )
    .await?;
    print_phase("direct (no queue)", &direct);
    drop(direct_collector);

    // 1. One collector acknowledging into JetStream, no sink running.
    let (collector, addr) = Collector::start(args, url, queue_args)?;
    wait_until_up(addr).await?;
    let batch_url = format!("http://{addr}/v1/batch?key={}", project.write_key);
    watch.pid = collector.pid();
    let nats_before = (nats_cpu_secs(), Instant::now());
    let acked = closed_loop(
        args,
        &batch_url,
        make_bodies(0, requests, args.batch),
        &mut watch,
    )
    .await?;
    let nats_cores = (nats_cpu_secs() - nats_before.0) / nats_before.1.elapsed().as_secs_f64();
    print_phase("into JetStream", &acked);
    println!("NATS server CPU during it: {nats_cores:.2} cores");

    // 2. One sink drains that backlog.
    let backlog_1 = stream_messages(js, stream).await?;
    fresh_checkpoint(args, &mut watch).await?;
    let sink = Collector::sink(args, url, queue_args)?;
    let (one_secs, one_cpu, one_sink_cores) = drain(js, stream, &[&sink], &mut watch).await?;
    let one_rate = acked.accepted as f64 / one_secs;
    println!("one sink: {} events ({backlog_1} messages) committed in {one_secs:.1} s = {one_rate:.0} events/s; sink {one_sink_cores:.2} cores, Postgres {:.2}, machine {:.2}", acked.accepted, one_cpu.postgres, one_cpu.machine);
    drop(sink);

    // 3. The same backlog again, drained by two sinks sharing the consumer.
    watch.pid = collector.pid();
    let refill = closed_loop(
        args,
        &batch_url,
        make_bodies(2, requests, args.batch),
        &mut watch,
    )
    .await?;
    print_phase("into JetStream (again)", &refill);
    fresh_checkpoint(args, &mut watch).await?;
    let sinks = [
        Collector::sink(args, url, queue_args)?,
        Collector::sink(args, url, queue_args)?,
    ];
    let (two_secs, two_cpu, two_sink_cores) =
        drain(js, stream, &[&sinks[0], &sinks[1]], &mut watch).await?;
    let two_rate = refill.accepted as f64 / two_secs;
    println!("two sinks: {} events committed in {two_secs:.1} s = {two_rate:.0} events/s; sinks {two_sink_cores:.2} cores, Postgres {:.2}, machine {:.2}", refill.accepted, two_cpu.postgres, two_cpu.machine);

    drop(sinks);

    // 4. Half of the collector's rate, open loop, no sink running: the collector's own
    //    latency at half load (the goal's measure), as in `bench collector`.
    let rate = acked.events_per_sec() / 2.0 / args.batch as f64;
    let n = (rate * args.duration_secs as f64).ceil() as usize;
    println!(
        "half: {rate:.0} requests/s open loop for {} s, no sink running",
        args.duration_secs
    );
    let half = open_loop(
        args,
        &batch_url,
        make_bodies(3, n.max(1), args.batch),
        rate,
        &mut watch,
    )
    .await?;
    print_phase("half (into JetStream)", &half);

    // 5. End to end: half of what one sink commits, one sink running (after it has drained
    //    phase 4's backlog), with lag probes.
    let sink = Collector::sink(args, url, queue_args)?;
    drain(js, stream, &[&sink], &mut watch).await?;
    let e2e_rate = one_rate / 2.0 / args.batch as f64;
    let n = (e2e_rate * args.duration_secs as f64).ceil() as usize;
    println!(
        "end to end: {e2e_rate:.0} requests/s open loop for {} s, one sink running, lag probes",
        args.duration_secs
    );
    fresh_checkpoint(args, &mut watch).await?;
    let probes = tokio::spawn(probe_lag(
        batch_url.clone(),
        url.to_owned(),
        project.id,
        Instant::now() + Duration::from_secs(args.duration_secs),
    ));
    let e2e = open_loop(
        args,
        &batch_url,
        make_bodies(5, n.max(1), args.batch),
        e2e_rate,
        &mut watch,
    )
    .await?;
    let mut lags = probes.await??;
    print_phase("end to end (into JetStream, one sink)", &e2e);
    let max_backlog = stream_messages(js, stream).await?;
    drain(js, stream, &[&sink], &mut watch).await?;
    lags.sort();
    let lag_pct = |p: f64| {
        lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or_default()
    };
    let (lag_p50, lag_p99, lag_max) = (lag_pct(0.5), lag_pct(0.99), lag_pct(1.0));
    println!("end-to-end lag (200 to row visible), {} probes: p50 {lag_p50:.1} ms, p99 {lag_p99:.1} ms, max {lag_max:.1} ms; {max_backlog} messages in the stream when the load stopped", lags.len());
    drop(sink);
    drop(collector);

    // Everything acknowledged is stored, once.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE project_id = $1")
        .bind(project.id)
        .fetch_one(&mut probe)
        .await?;
    let acknowledged = direct.accepted
        + acked.accepted
        + refill.accepted
        + half.accepted
        + e2e.accepted
        + lags.len() as u64;
    println!("stored {stored} events; acknowledged {acknowledged}");
    anyhow::ensure!(
        stored as u64 == acknowledged,
        "stored {stored} events but {acknowledged} were acknowledged"
    );
    probe.close().await?;
    store.pool().close().await;

    println!();
    println!("| measure | events/s | p50 | p99 | CPU (cores) |");
    println!("|---|---|---|---|---|");
    println!(
        "| direct commit, one collector, {} clients (no queue) | {:.0} | {:.1} ms | {:.1} ms | collector {:.2}, Postgres {:.2}, machine {:.2} |",
        args.clients, direct.events_per_sec(), direct.p50_ms, direct.p99_ms, direct.cpu.collector, direct.cpu.postgres, direct.cpu.machine
    );
    println!(
        "| acknowledged into JetStream, one collector, {} clients | {:.0} | {:.1} ms | {:.1} ms | collector {:.2}, NATS {nats_cores:.2}, machine {:.2} |",
        args.clients, acked.events_per_sec(), acked.p50_ms, acked.p99_ms, acked.cpu.collector, acked.cpu.machine
    );
    println!(
        "| committed by one sink (backlog of {}) | {one_rate:.0} | — | — | sink {one_sink_cores:.2}, Postgres {:.2}, machine {:.2} |",
        acked.accepted, one_cpu.postgres, one_cpu.machine
    );
    println!(
        "| committed by two sinks (backlog of {}) | {two_rate:.0} | — | — | sinks {two_sink_cores:.2}, Postgres {:.2}, machine {:.2} |",
        refill.accepted, two_cpu.postgres, two_cpu.machine
    );
    println!(
        "| half of the collector's rate, open loop, no sink running | {:.0} | {:.1} ms | {:.1} ms | collector {:.2}, machine {:.2} |",
        half.events_per_sec(), half.p50_ms, half.p99_ms, half.cpu.collector, half.cpu.machine
    );
    println!(
        "| half of one sink's rate, open loop, one sink running | {:.0} | {:.1} ms | {:.1} ms | collector {:.2}, Postgres {:.2}, machine {:.2} |",
        e2e.events_per_sec(), e2e.p50_ms, e2e.p99_ms, e2e.cpu.collector, e2e.cpu.postgres, e2e.cpu.machine
    );
    println!(
        "| end-to-end lag then (200 to row visible, {} probes) | — | {lag_p50:.1} ms | {lag_p99:.1} ms (max {lag_max:.1} ms) | |",
        lags.len()
    );
    println!(
        "\nfailed (non-200) requests: direct {}, into JetStream {} and {}, half {}, end to end {}",
        direct.failed, acked.failed, refill.failed, half.failed, e2e.failed
    );
    Ok(())
}
