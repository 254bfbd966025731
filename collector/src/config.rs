//! The collector's configuration: one struct per concern, built once from the command line
//! (and its `TRACKLET_*` environment equivalents) in [`crate::cli`], then passed down.
//!
//! Nothing below `main` reads the environment; tests build these structs directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::ratelimit::RateLimitConfig;

/// Which database to use.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `postgres://...` (production) or `sqlite:...`; `None` uses [`DbConfig::sqlite_path`].
    pub database_url: Option<String>,
    /// Embedded SQLite file used when no database URL is given.
    pub sqlite_path: PathBuf,
    /// Postgres pool size.
    pub max_connections: u32,
}

/// Group commit tuning (see [`crate::commit`]).
#[derive(Debug, Clone)]
pub struct CommitConfig {
    /// A transaction is started once this many rows are waiting...
    pub max_rows: usize,
    /// ...or once the first waiting row has waited this long. With several transactions in
    /// flight ([`CommitConfig::concurrency`]) no wait is needed: rows gather by themselves
    /// while every slot is busy, and a lone request at low load is committed at once.
    pub max_delay: Duration,
    /// Rows accepted into the queue before requests get 503 (bounds memory).
    pub queue_capacity_rows: usize,
    /// Bytes of rows (strings and raw props/context, see `EventRow::approx_bytes`) accepted
    /// into the queue before requests get 503: rows alone would allow 50,000 x 32 KiB.
    pub queue_capacity_bytes: usize,
    /// `/readyz` reports not ready above this many queued rows.
    pub high_water_rows: usize,
    /// Attempts per transaction while the database is unreachable, before answering 503.
    pub max_attempts: u32,
    /// Group-commit transactions in flight at once (each on its own connection): while one
    /// waits for its commit to be flushed, the next gathers and inserts.
    pub concurrency: usize,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            max_rows: 2000,
            max_delay: Duration::ZERO,
            queue_capacity_rows: 50_000,
            queue_capacity_bytes: 64 * 1024 * 1024,
            high_water_rows: 40_000,
            max_attempts: 3,
            concurrency: 4,
        }
    }
}

/// Everything `serve` needs besides the database.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Files served under `/` (GET only) after the API routes.
    pub static_dir: Option<PathBuf>,
    /// Take the client IP from the last `X-Forwarded-For` entry (set only behind a proxy).
    pub trust_forwarded_for: bool,
    /// MaxMind-format database for country/city lookup.
    pub geoip_db: Option<PathBuf>,
    /// Drop event partitions older than this many months; 0 keeps everything.
    pub retention_months: u32,
    /// Monthly partitions created ahead of the current month.
    pub partition_months_ahead: u32,
    /// How often partitions are created/dropped while serving.
    pub partition_interval: Duration,
    pub commit: CommitConfig,
    /// Batches decoded at the same time; more get 503 (bounds memory: each may hold up to
    /// 1 MiB compressed + 10 MiB decompressed).
    pub max_inflight_batches: usize,
    /// Bytes all request bodies may hold at once, compressed and inflated; a request that
    /// would go past it gets 503 (bounds memory against large and compressed bodies).
    pub body_memory_bytes: usize,
    /// Time allowed to receive a request body (408 after).
    pub body_read_timeout: Duration,
    /// Connections served at once; at the cap new ones wait in the listen backlog (see
    /// [`crate::transport`]).
    pub max_connections: usize,
    /// Time allowed for a request head (for the first request: from accept).
    pub header_read_timeout: Duration,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Longest wait for in-flight requests and the commit queue on shutdown.
    pub shutdown_timeout: Duration,
    /// How long batch receipts ("batch X arrived", for `POST /v1/batch/status`) are kept:
    /// the SDK asks when the next page loads, which may be days later.
    pub batch_receipt_ttl: Duration,
    /// How often the projects table is reloaded into memory (a project added or changed with
    /// `projects add` is seen within this long; keys are never looked up in the database).
    pub projects_refresh_interval: Duration,
    /// Per-project default and per-address rate limits (see [`crate::ratelimit`]).
    pub rate_limit: RateLimitConfig,
    /// Scheduled backups (`--backup-dir`), if any.
    pub backup: Option<crate::export::BackupConfig>,
    /// Webhook delivery workers (`--webhook-*`).
    pub webhooks: crate::webhooks::WebhookConfig,
    /// `--queue`: publish accepted events to NATS JetStream (answer once it acknowledges)
    /// instead of committing them here; `sink` commits them. `None`: direct group commit.
    pub queue: Option<QueueConfig>,
    /// With a queue: the sinks' durable consumer, whose lag the ingest health shows.
    pub queue_consumer: String,
}

/// Default of [`ServeConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of [`ServeConfig::header_read_timeout`], in seconds.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 5;
/// Default of [`ServeConfig::idle_timeout`], in seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default of [`ServeConfig::projects_refresh_interval`], in milliseconds.
pub const DEFAULT_PROJECTS_REFRESH_MS: u64 = 2000;

/// Default of [`ServeConfig::batch_receipt_ttl`], in days.
pub const DEFAULT_BATCH_RECEIPT_TTL_DAYS: u32 = 30;

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            static_dir: None,
            trust_forwarded_for: false,
            geoip_db: None,
            retention_months: 0,
            partition_months_ahead: 3,
            partition_interval: Duration::from_secs(3600),
            commit: CommitConfig::default(),
            max_inflight_batches: 128,
            body_memory_bytes: 64 * 1024 * 1024,
            body_read_timeout: crate::limits::BODY_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_SECS),
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            shutdown_timeout: Duration::from_secs(30),
            batch_receipt_ttl: days(DEFAULT_BATCH_RECEIPT_TTL_DAYS),
            projects_refresh_interval: Duration::from_millis(DEFAULT_PROJECTS_REFRESH_MS),
            rate_limit: RateLimitConfig::default(),
            backup: None,
            webhooks: crate::webhooks::WebhookConfig::default(),
            queue: None,
            queue_consumer: DEFAULT_SINK_CONSUMER.to_owned(),
        }
    }
}

/// The JetStream stream between collectors and sinks (see [`crate::queue`]); `serve --queue`
/// and `sink` take the same flags, and either creates the stream when it is missing.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// `nats://HOST:PORT` (several, comma-separated, for a cluster).
    pub url: String,
    /// The stream's name.
    pub stream: String,
    /// Events of project P go to subject `<subject_prefix>.<P>`; the stream holds
    /// `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// Copies of every message in a cluster (1 on a single server, 3 in production).
    pub replicas: usize,
    /// Bytes the stream may hold before publishes are refused (the collectors answer 503).
    pub max_bytes: i64,
    /// Age after which a message not yet committed by a sink is deleted (lost): longer than
    /// any database outage to be ridden out.
    pub max_age: Duration,
    /// Window in which JetStream drops a message whose `Nats-Msg-Id` it has already seen.
    pub duplicate_window: Duration,
    /// Longest wait for JetStream's acknowledgement of a publish (503 after).
    pub publish_timeout: Duration,
}

/// Default name of the sinks' durable consumer (`sink --consumer`).
pub const DEFAULT_SINK_CONSUMER: &str = "tracklet-sink";

/// Default of [`QueueConfig::stream`].
pub const DEFAULT_QUEUE_STREAM: &str = "TRACKLET_EVENTS";
/// Default of [`QueueConfig::subject_prefix`].
pub const DEFAULT_QUEUE_SUBJECT_PREFIX: &str = "tracklet.events";

/// Everything `sink` needs besides the database.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub queue: QueueConfig,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// The durable consumer's name; sinks sharing it share the work.
    pub consumer: String,
    /// Messages asked for per pull request.
    pub fetch_max_messages: usize,
    /// Messages received but not yet committed and acknowledged, at most.
    pub max_inflight_messages: usize,
    /// A message not acknowledged this long after delivery is delivered again (to any sink).
    pub ack_wait: Duration,
    pub commit: CommitConfig,
    /// Monthly partitions to create ahead of the current month.
    pub partition_months_ahead: u32,
    /// Longest wait for in-flight commits on shutdown.
    pub shutdown_timeout: Duration,
}

/// `n` days as a [`Duration`].
pub fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 24 * 3600)
}
