//! The command line: `serve`, `sink`, `migrate`, `projects add|list|remove`, `export`,
//! `import`, `destinations ...` (webhooks).
//!
//! Every flag has a `TRACKLET_*` environment equivalent (and `DATABASE_URL`); the parsed
//! arguments become the structs of [`crate::config`] here, once, and are passed down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    self, CommitConfig, DbConfig, QueueConfig, RateLimitConfig, ServeConfig, SinkConfig,
};
use crate::export;
use crate::http::{self, AppState};
use crate::metrics;
use crate::queue::publisher::EventPublisher;
use crate::ratelimit;
use crate::receipts;
use crate::shutdown::Shutdown;
use crate::store::{self, EventStore, Project};
use crate::transport;
use crate::webhooks;

#[derive(Debug, Parser)]
#[command(
    name = "tracklet-collector",
    version,
    about = "Receives Tracklet event batches and stores them in Postgres (or an embedded SQLite file)."
)]
pub struct Cli {
    #[command(flatten)]
    pub db: DbArgs,
    /// Log format.
    #[arg(long, env = "TRACKLET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `tracklet_collector=debug`.
    #[arg(
        long,
        env = "TRACKLET_LOG",
        default_value = "info,sqlx=warn",
        global = true
    )]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// Postgres URL (`postgres://user@host/db`) or `sqlite:PATH`. Without it, the embedded
    /// SQLite file at --sqlite-path is used.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Embedded SQLite file used when no database URL is given.
    #[arg(
        long,
        env = "TRACKLET_SQLITE_PATH",
        default_value = "./tracklet.sqlite3",
        global = true
    )]
    pub sqlite_path: PathBuf,
    /// Postgres connection pool size.
    #[arg(
        long,
        env = "TRACKLET_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (applies migrations first).
    Serve(ServeArgs),
    /// Commit the events collectors published to the queue (`serve --queue`) into the
    /// database; several sinks share the work.
    Sink(SinkArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Manage projects (write keys, read keys, allowed origins, rate limits).
    Projects {
        #[command(subcommand)]
        command: ProjectsCommand,
    },
    /// Write a project's events, in `ts` order, as NDJSON or CSV (to stdout by default).
    Export(ExportArgs),
    /// Store the events of an NDJSON export (gzipped or not) in a project, skipping the
    /// event ids already stored; prints `{"read", "stored", "duplicates"}`.
    Import(ImportArgs),
    /// Manage webhook destinations (signed deliveries of committed events).
    Destinations(DestinationsArgs),
}

#[derive(Debug, Args)]
pub struct DestinationsArgs {
    /// Allow destination URLs resolving to loopback, private or link-local addresses.
    #[arg(long, env = "TRACKLET_ALLOW_PRIVATE_DESTINATIONS", global = true)]
    pub allow_private_destinations: bool,
    #[command(subcommand)]
    pub command: DestinationsCommand,
}

#[derive(Debug, Subcommand)]
pub enum DestinationsCommand {
    /// Add a destination; prints its id and its secret (shown this once).
    Add {
        /// The project's name or id.
        #[arg(long)]
        project: String,
        /// Where deliveries are POSTed (http or https).
        #[arg(long)]
        url: String,
        /// Only these event names, comma-separated (default: every event).
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// Events per delivery, at most.
        #[arg(long, default_value_t = webhooks::DEFAULT_BATCH_SIZE,
              value_parser = clap::value_parser!(u32).range(1..=webhooks::MAX_BATCH_SIZE as i64))]
        batch_size: u32,
    },
    /// Print every destination as a JSON array (without secrets).
    List,
    /// Remove a destination and its queued deliveries.
    Remove { id: uuid::Uuid },
    /// Stop queueing and sending deliveries to a destination.
    Disable { id: uuid::Uuid },
    /// Queue and send again (deliveries queued before it was disabled are sent).
    Enable { id: uuid::Uuid },
    /// A new secret (printed once); the previous one keeps signing for 24 hours.
    RotateSecret { id: uuid::Uuid },
    /// Per destination: pending, in flight, delivered, failed, last error, next attempt.
    Status { id: Option<uuid::Uuid> },
    /// Queue a destination's failed deliveries again (same webhook-id).
    Replay {
        id: uuid::Uuid,
        /// Deliveries created from this time on (ms since the epoch, RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        from: Option<String>,
        /// Deliveries created before this time.
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The project's name or id.
    #[arg(long)]
    pub project: String,
    /// Events from this time on (ms since the epoch, RFC 3339 or YYYY-MM-DD); default: all.
    #[arg(long)]
    pub from: Option<String>,
    /// Events before this time; default: all.
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long, value_enum, default_value_t = export::Format::Ndjson)]
    pub format: export::Format,
    /// Gzip the output.
    #[arg(long)]
    pub gzip: bool,
    /// Write to this file instead of stdout (written under a temporary name, renamed when
    /// complete).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The project's name or id.
    #[arg(long)]
    pub project: String,
    /// An NDJSON export (`export --format ndjson`, or a backup); `-` for stdin.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TRACKLET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Also serve the files of this directory under `/` (GET only, after the API routes).
    #[arg(long, env = "TRACKLET_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
    /// Take the client IP from the last X-Forwarded-For entry (only behind a trusted proxy).
    #[arg(long, env = "TRACKLET_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
    /// MaxMind-format database (GeoLite2-City.mmdb) for country/city lookup.
    #[arg(long, env = "TRACKLET_GEOIP_DB")]
    pub geoip_db: Option<PathBuf>,
    /// Drop event partitions older than this many months (0: keep forever).
    #[arg(long, env = "TRACKLET_RETENTION_MONTHS", default_value_t = 0)]
    pub retention_months: u32,
    /// Monthly partitions to create ahead of the current month.
    #[arg(long, env = "TRACKLET_PARTITION_MONTHS_AHEAD", default_value_t = 3)]
    pub partition_months_ahead: u32,
    /// Seconds between partition maintenance runs.
    #[arg(long, env = "TRACKLET_PARTITION_INTERVAL_SECS", default_value_t = 3600)]
    pub partition_interval_secs: u64,
    /// Rows per group-commit transaction (at most).
    #[arg(long, env = "TRACKLET_COMMIT_MAX_ROWS", default_value_t = 2000)]
    pub commit_max_rows: usize,
    /// Group-commit transactions in flight at once (keep below --db-max-connections).
    #[arg(long, env = "TRACKLET_COMMIT_CONCURRENCY", default_value_t = 4)]
    pub commit_concurrency: usize,
    /// Milliseconds a group commit waits for more rows after the first.
    #[arg(long, env = "TRACKLET_COMMIT_MAX_DELAY_MS", default_value_t = 0)]
    pub commit_max_delay_ms: u64,
    /// Rows the commit queue holds before answering 503.
    #[arg(long, env = "TRACKLET_QUEUE_CAPACITY_ROWS", default_value_t = 50_000)]
    pub queue_capacity_rows: usize,
    /// Mebibytes of rows (their strings and props) the commit queue holds before answering
    /// 503: bounds memory when rows are large.
    #[arg(long, env = "TRACKLET_QUEUE_CAPACITY_MB", default_value_t = 64)]
    pub queue_capacity_mb: usize,
    /// Batches decoded at the same time before answering 503 (bounds memory).
    #[arg(long, env = "TRACKLET_MAX_INFLIGHT_BATCHES", default_value_t = 128)]
    pub max_inflight_batches: usize,
    /// Mebibytes all request bodies may hold at once, compressed and inflated, before
    /// answering 503 (bounds memory against large and compressed bodies).
    #[arg(long, env = "TRACKLET_BODY_MEMORY_MB", default_value_t = 64)]
    pub body_memory_mb: usize,
    /// Seconds allowed to receive a request body (408 after).
    #[arg(long, env = "TRACKLET_BODY_TIMEOUT_SECS", default_value_t = 10)]
    pub body_timeout_secs: u64,
    /// Connections served at once; at the cap new ones wait in the listen backlog until one
    /// closes (nothing is accepted only to be closed).
    #[arg(long, env = "TRACKLET_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (for the first request: from
    /// connect); the connection is closed after.
    #[arg(long, env = "TRACKLET_HEADER_READ_TIMEOUT_SECS", default_value_t = config::DEFAULT_HEADER_READ_TIMEOUT_SECS)]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in progress (keep-alive).
    #[arg(long, env = "TRACKLET_IDLE_TIMEOUT_SECS", default_value_t = config::DEFAULT_IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// Seconds allowed for draining on SIGTERM/SIGINT.
    #[arg(long, env = "TRACKLET_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// Days batch receipts are kept for POST /v1/batch/status (1 to 3650); older ones are
    /// deleted hourly.
    #[arg(
        long,
        env = "TRACKLET_BATCH_RECEIPT_TTL_DAYS",
        default_value_t = config::DEFAULT_BATCH_RECEIPT_TTL_DAYS,
        value_parser = clap::value_parser!(u32).range(1..=3650)
    )]
    pub batch_receipt_ttl_days: u32,
    /// Milliseconds between reloads of the projects table into memory (keys are never looked
    /// up in the database per request; a new or changed project is seen within this long).
    #[arg(
        long,
        env = "TRACKLET_PROJECTS_REFRESH_MS",
        default_value_t = config::DEFAULT_PROJECTS_REFRESH_MS,
        value_parser = clap::value_parser!(u64).range(10..)
    )]
    pub projects_refresh_ms: u64,
    /// Events per second for projects without their own --rate-limit (0: unlimited). Each
    /// bucket holds two seconds of traffic.
    #[arg(
        long,
        env = "TRACKLET_RATE_LIMIT_DEFAULT",
        default_value_t = ratelimit::DEFAULT_PROJECT_EVENTS_PER_SEC
    )]
    pub rate_limit_default: u32,
    /// Events per second per client address, all projects together (0: off). The address is
    /// the peer's, or the last X-Forwarded-For entry with --trust-forwarded-for.
    #[arg(long, env = "TRACKLET_RATE_LIMIT_PER_IP", default_value_t = 0)]
    pub rate_limit_per_ip: u32,
    /// Write a gzipped NDJSON backup of every project into this directory every
    /// --backup-every (off without it). Restore one with `import`.
    #[arg(long, env = "TRACKLET_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Time between backups, e.g. `24h`, `30m`.
    #[arg(long, env = "TRACKLET_BACKUP_EVERY", default_value = "24h", value_parser = humantime::parse_duration)]
    pub backup_every: Duration,
    /// Backups kept per project; older ones are deleted after each run.
    #[arg(long, env = "TRACKLET_BACKUP_KEEP", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    pub backup_keep: u32,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// With --queue: the sinks' durable consumer (their --consumer), whose lag the ingest
    /// health (`/v1/stats/health`, the dashboard) shows.
    #[arg(long, env = "TRACKLET_SINK_CONSUMER", default_value = config::DEFAULT_SINK_CONSUMER)]
    pub queue_consumer: String,
}

/// The queue's flags, shared by `serve` and `sink`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// NATS server(s) with JetStream, e.g. `nats://127.0.0.1:4222` (comma-separated for a
    /// cluster). With it, `serve` publishes accepted events to the stream and answers once
    /// JetStream acknowledges them; `sink` commits them. Without it, `serve` commits directly.
    #[arg(long, env = "TRACKLET_QUEUE")]
    pub queue: Option<String>,
    /// The JetStream stream (created when missing).
    #[arg(long, env = "TRACKLET_QUEUE_STREAM", default_value = config::DEFAULT_QUEUE_STREAM)]
    pub queue_stream: String,
    /// Subject prefix: project P's events go to `<prefix>.<P>`.
    #[arg(long, env = "TRACKLET_QUEUE_SUBJECT_PREFIX", default_value = config::DEFAULT_QUEUE_SUBJECT_PREFIX)]
    pub queue_subject_prefix: String,
    /// Copies of each message when the stream is created (3 on a three-node cluster).
    #[arg(long, env = "TRACKLET_QUEUE_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub queue_replicas: u8,
    /// Mebibytes of uncommitted events the stream holds before refusing more (collectors
    /// then answer 503).
    #[arg(long, env = "TRACKLET_QUEUE_MAX_MB", default_value_t = 4096)]
    pub queue_max_mb: u64,
    /// Hours after which an uncommitted event is deleted from the stream (lost): longer than
    /// any database outage to ride out.
    #[arg(long, env = "TRACKLET_QUEUE_MAX_AGE_HOURS", default_value_t = 168)]
    pub queue_max_age_hours: u64,
    /// Seconds in which JetStream drops a message with an id it has already stored.
    #[arg(
        long,
        env = "TRACKLET_QUEUE_DUPLICATE_WINDOW_SECS",
        default_value_t = 120
    )]
    pub queue_duplicate_window_secs: u64,
    /// Milliseconds to wait for JetStream's acknowledgement of a publish (503 after).
    #[arg(
        long,
        env = "TRACKLET_QUEUE_PUBLISH_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub queue_publish_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Address of the sink's `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "TRACKLET_SINK_LISTEN", default_value = "127.0.0.1:9091")]
    pub listen: SocketAddr,
    /// Durable consumer name; sinks with the same name share the messages.
    #[arg(long, env = "TRACKLET_SINK_CONSUMER", default_value = config::DEFAULT_SINK_CONSUMER)]
    pub consumer: String,
    /// Messages asked for per pull request.
    #[arg(long, env = "TRACKLET_SINK_FETCH_MAX", default_value_t = 256)]
    pub fetch_max: usize,
    /// Messages being committed at once, at most (each is one batch).
    #[arg(long, env = "TRACKLET_SINK_MAX_INFLIGHT", default_value_t = 1024)]
    pub max_inflight: usize,
    /// Seconds a delivered message may stay unacknowledged before it is delivered again.
    #[arg(long, env = "TRACKLET_SINK_ACK_WAIT_SECS", default_value_t = 30)]
    pub ack_wait_secs: u64,
    /// Rows per group-commit transaction (at most).
    #[arg(long, env = "TRACKLET_COMMIT_MAX_ROWS", default_value_t = 2000)]
    pub commit_max_rows: usize,
    /// Group-commit transactions in flight at once (keep below --db-max-connections).
    #[arg(long, env = "TRACKLET_COMMIT_CONCURRENCY", default_value_t = 4)]
    pub commit_concurrency: usize,
    /// Monthly partitions to create ahead of the current month.
    #[arg(long, env = "TRACKLET_PARTITION_MONTHS_AHEAD", default_value_t = 3)]
    pub partition_months_ahead: u32,
    /// Seconds allowed for committing in-flight messages on SIGTERM/SIGINT.
    #[arg(long, env = "TRACKLET_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    #[command(flatten)]
    pub queue: QueueArgs,
}

/// `serve`'s webhook delivery flags.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Webhook requests in flight per destination (all collectors sharing the database).
    #[arg(long, env = "TRACKLET_WEBHOOK_CONCURRENCY", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_concurrency: u32,
    /// Webhook requests in flight in this collector, all destinations together.
    #[arg(long, env = "TRACKLET_WEBHOOK_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_max_in_flight: u32,
    /// Waits before each retry, comma-separated; after the last retry a delivery fails.
    #[arg(long, env = "TRACKLET_WEBHOOK_RETRY_SCHEDULE", default_value = webhooks::DEFAULT_RETRY_SCHEDULE, value_parser = webhooks::parse_schedule)]
    pub webhook_retry_schedule: std::vec::Vec<Duration>,
    /// Time allowed per attempt (connect to last byte).
    #[arg(long, env = "TRACKLET_WEBHOOK_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
    /// How long a claimed delivery stays claimed: a collector that dies mid-attempt lets
    /// its deliveries go after this (keep it above --webhook-timeout).
    #[arg(long, env = "TRACKLET_WEBHOOK_LEASE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub webhook_lease: Duration,
    /// How often due deliveries are looked for.
    #[arg(long, env = "TRACKLET_WEBHOOK_POLL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub webhook_poll: Duration,
    /// Days delivered deliveries are kept (failed ones are kept until replayed or removed).
    #[arg(long, env = "TRACKLET_WEBHOOK_KEEP_DELIVERED_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_keep_delivered_days: u32,
    /// Webhook attempts started per --webhook-poll interval (and at most in flight) in this
    /// collector while ingest is saturated (rows waited for a commit slot in the last
    /// second): deliveries yield the cores to the requests waiting for their commit, and
    /// catch up after.
    #[arg(long, env = "TRACKLET_WEBHOOK_BUSY_DELIVERIES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_busy_deliveries: u32,
    /// Send no webhooks from this collector (others sharing the database do).
    #[arg(long, env = "TRACKLET_NO_WEBHOOK_WORKERS")]
    pub no_webhook_workers: bool,
    /// Allow destination URLs resolving to loopback, private or link-local addresses.
    #[arg(long, env = "TRACKLET_ALLOW_PRIVATE_DESTINATIONS")]
    pub allow_private_destinations: bool,
}

impl WebhookArgs {
    pub fn to_config(&self) -> webhooks::WebhookConfig {
        webhooks::WebhookConfig {
            concurrency: self.webhook_concurrency,
            max_in_flight: self.webhook_max_in_flight,
            busy_deliveries: self.webhook_busy_deliveries.min(self.webhook_max_in_flight),
            retry_schedule: self.webhook_retry_schedule.clone(),
            timeout: self.webhook_timeout.max(Duration::from_millis(100)),
            lease: self
                .webhook_lease
                .max(self.webhook_timeout + Duration::from_secs(1)),
            poll_interval: self.webhook_poll.max(Duration::from_millis(10)),
            allow_private: self.allow_private_destinations,
            keep_delivered: config::days(self.webhook_keep_delivered_days),
            disabled: self.no_webhook_workers,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    /// Create a project; prints it as one JSON object.
    Add {
        #[arg(long)]
        name: String,
        /// Allowed browser origin, e.g. https://example.com (repeat for several; `*` for any).
        #[arg(long = "origin")]
        origins: Vec<String>,
        /// Events per second this project may send (default: serve's --rate-limit-default;
        /// 0: unlimited).
        #[arg(long)]
        rate_limit: Option<u32>,
    },
    /// Print all projects as a JSON array.
    List,
    /// Remove a project by name or id.
    Remove {
        /// Name of the project.
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        name: Option<String>,
        /// Id of the project.
        #[arg(long)]
        id: Option<String>,
    },
}

impl DbArgs {
    pub fn to_config(&self) -> DbConfig {
        DbConfig {
            database_url: self.database_url.clone().filter(|u| !u.is_empty()),
            sqlite_path: self.sqlite_path.clone(),
            max_connections: self.db_max_connections,
        }
    }
}

impl ServeArgs {
    pub fn to_config(&self) -> ServeConfig {
        let queue = self.queue_capacity_rows.max(1);
        ServeConfig {
            listen: self.listen,
            static_dir: self.static_dir.clone(),
            trust_forwarded_for: self.trust_forwarded_for,
            geoip_db: self.geoip_db.clone(),
            retention_months: self.retention_months,
            partition_months_ahead: self.partition_months_ahead,
            partition_interval: Duration::from_secs(self.partition_interval_secs.max(1)),
            commit: CommitConfig {
                max_rows: self.commit_max_rows.max(1),
                max_delay: Duration::from_millis(self.commit_max_delay_ms),
                concurrency: self.commit_concurrency.max(1),
                queue_capacity_rows: queue,
                queue_capacity_bytes: self.queue_capacity_mb.max(1).saturating_mul(1024 * 1024),
                high_water_rows: queue / 5 * 4,
                ..CommitConfig::default()
            },
            max_inflight_batches: self.max_inflight_batches,
            // At least one largest body (1 MiB compressed + 10 MiB inflated) must fit.
            body_memory_bytes: self.body_memory_mb.max(12).saturating_mul(1024 * 1024),
            body_read_timeout: Duration::from_secs(self.body_timeout_secs.max(1)),
            max_connections: self.max_connections.max(1),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            batch_receipt_ttl: config::days(self.batch_receipt_ttl_days),
            projects_refresh_interval: Duration::from_millis(self.projects_refresh_ms),
            rate_limit: RateLimitConfig {
                project_default: self.rate_limit_default,
                per_ip: self.rate_limit_per_ip,
            },
            backup: self.backup_dir.clone().map(|dir| export::BackupConfig {
                dir,
                every: self.backup_every.max(Duration::from_secs(1)),
                keep: self.backup_keep as usize,
            }),
            webhooks: self.webhooks.to_config(),
            queue: self.queue.to_config(),
            queue_consumer: self.queue_consumer.clone(),
        }
    }
}

impl QueueArgs {
    /// `None` without `--queue` (or with an empty one).
    pub fn to_config(&self) -> Option<QueueConfig> {
        let url = self.queue.clone().filter(|u| !u.trim().is_empty())?;
        Some(QueueConfig {
            url,
            stream: self.queue_stream.clone(),
            subject_prefix: self.queue_subject_prefix.trim_end_matches('.').to_owned(),
            replicas: usize::from(self.queue_replicas),
            max_bytes: i64::try_from(self.queue_max_mb.max(1).saturating_mul(1024 * 1024))
                .unwrap_or(i64::MAX),
            max_age: Duration::from_secs(self.queue_max_age_hours.max(1).saturating_mul(3600)),
            duplicate_window: Duration::from_secs(self.queue_duplicate_window_secs.max(1)),
            publish_timeout: Duration::from_millis(self.queue_publish_timeout_ms.max(1)),
        })
    }
}

impl SinkArgs {
    pub fn to_config(&self) -> anyhow::Result<SinkConfig> {
        let queue = self
            .queue
            .to_config()
            .context("sink needs --queue nats://HOST:PORT (or TRACKLET_QUEUE)")?;
        let commit = CommitConfig {
            max_rows: self.commit_max_rows.max(1),
            concurrency: self.commit_concurrency.max(1),
            ..CommitConfig::default()
        };
        Ok(SinkConfig {
            queue,
            listen: self.listen,
            consumer: self.consumer.clone(),
            fetch_max_messages: self.fetch_max.max(1),
            max_inflight_messages: self.max_inflight.max(1),
            ack_wait: Duration::from_secs(self.ack_wait_secs.max(1)),
            commit,
            partition_months_ahead: self.partition_months_ahead,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
        })
    }
}

/// Sets up logging on stderr (stdout is for command output such as `projects add`).
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let db = cli.db.to_config();
    match cli.command {
        Command::Serve(args) => serve(&db, args.to_config()).await,
        Command::Sink(args) => crate::queue::sink::run(&db, args.to_config()?).await,
        Command::Migrate => {
            let store = open_migrated(&db).await?;
            tracing::info!(backend = store.backend(), "migrations applied");
            Ok(())
        }
        Command::Projects { command } => projects(&db, command).await,
        Command::Export(args) => export_command(&db, args).await,
        Command::Import(args) => import_command(&db, args).await,
        Command::Destinations(args) => destinations_command(&db, args).await,
    }
}

/// The project named (or with the id) `name_or_id`.
async fn find_project(store: &dyn EventStore, name_or_id: &str) -> anyhow::Result<Project> {
    store
        .list_projects()
        .await?
        .into_iter()
        .find(|p| p.name == name_or_id || p.id.to_string() == name_or_id)
        .with_context(|| format!("no project named {name_or_id:?}"))
}

async fn export_command(db: &DbConfig, args: ExportArgs) -> anyhow::Result<()> {
    let store = open_migrated(db).await?;
    let project = find_project(store.as_ref(), &args.project).await?;
    let range = export::time_range(args.from.as_deref(), args.to.as_deref())
        .map_err(|e| anyhow::anyhow!("--from/--to: {e}"))?;
    let count = match &args.out {
        Some(path) => {
            let partial = PathBuf::from(format!("{}.partial", path.display()));
            let file = std::fs::File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            let written = export::export_to(
                store.as_ref(),
                project.id,
                range,
                args.format,
                args.gzip,
                file,
            )
            .await;
            match written {
                Ok(count) => {
                    std::fs::rename(&partial, path)
                        .with_context(|| format!("cannot rename to {}", path.display()))?;
                    count
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e.into());
                }
            }
        }
        None => {
            let out = std::io::stdout();
            export::export_to(
                store.as_ref(),
                project.id,
                range,
                args.format,
                args.gzip,
                out,
            )
            .await?
        }
    };
    tracing::info!(project = %project.name, events = count, "exported");
    Ok(())
}

async fn import_command(db: &DbConfig, args: ImportArgs) -> anyhow::Result<()> {
    let store = open_migrated(db).await?;
    let project = find_project(store.as_ref(), &args.project).await?;
    let input: Box<dyn std::io::Read> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.file)
                .with_context(|| format!("cannot open {}", args.file.display()))?,
        )
    };
    let mut report = export::ImportReport::default();
    let result = export::import(store.as_ref(), project.id, input, &mut report).await;
    // What was stored before a failure stays stored: say how much.
    println!("{}", serde_json::to_string(&report)?);
    result.map_err(Into::into)
}

async fn destinations_command(db: &DbConfig, args: DestinationsArgs) -> anyhow::Result<()> {
    let store = open_migrated(db).await?;
    let queue = store
        .deliveries()
        .context("this database has no webhook queue")?;
    let print = |value: serde_json::Value| println!("{value}");
    let found = |ok: bool, id: uuid::Uuid| {
        anyhow::ensure!(ok, "no destination {id}");
        Ok(())
    };
    match args.command {
        DestinationsCommand::Add {
            project,
            url,
            events,
            batch_size,
        } => {
            let project = find_project(store.as_ref(), &project).await?;
            let url =
                webhooks::destinations::check_url(&url, args.allow_private_destinations).await?;
            let destination = webhooks::NewDestination {
                id: uuid::Uuid::now_v7(),
                project_id: project.id,
                url: url.to_string(),
                events: events
                    .iter()
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect(),
                batch_size,
                secret: webhooks::signing::new_secret(),
            };
            queue.add_destination(&destination).await?;
            print(serde_json::json!({
                "id": destination.id,
                "project": project.name,
                "url": destination.url,
                "events": destination.events,
                "batch_size": destination.batch_size,
                "secret": destination.secret,
            }));
        }
        DestinationsCommand::List => {
            println!(
                "{}",
                serde_json::to_string(&queue.list_destinations().await?)?
            );
        }
        DestinationsCommand::Remove { id } => {
            found(queue.remove_destination(id).await?, id)?;
            eprintln!("removed destination {id}");
        }
        DestinationsCommand::Disable { id } => {
            found(
                queue
                    .set_enabled(id, false, Some("disabled by hand"))
                    .await?,
                id,
            )?;
            eprintln!("disabled destination {id}");
        }
        DestinationsCommand::Enable { id } => {
            found(queue.set_enabled(id, true, None).await?, id)?;
            eprintln!("enabled destination {id}");
        }
        DestinationsCommand::RotateSecret { id } => {
            let secret = webhooks::signing::new_secret();
            let until = Utc::now()
                + chrono::Duration::from_std(webhooks::ROTATION_OVERLAP)
                    .unwrap_or(chrono::Duration::hours(24));
            found(queue.rotate_secret(id, &secret, until).await?, id)?;
            print(serde_json::json!({
                "id": id,
                "secret": secret,
                "previous_secret_valid_until": until,
            }));
        }
        DestinationsCommand::Status { id } => {
            let status: Vec<_> = queue
                .status(None, Utc::now())
                .await?
                .into_iter()
                .filter(|s| id.is_none_or(|id| s.id == id))
                .collect();
            if let Some(id) = id {
                anyhow::ensure!(!status.is_empty(), "no destination {id}");
            }
            println!("{}", serde_json::to_string(&status)?);
        }
        DestinationsCommand::Replay { id, from, to } => {
            let (from, to) = export::time_range(from.as_deref(), to.as_deref())
                .map_err(|e| anyhow::anyhow!("--from/--to: {e}"))?;
            let known = queue.list_destinations().await?.iter().any(|d| d.id == id);
            found(known, id)?;
            let requeued = queue.replay(id, from, to, Utc::now()).await?;
            print(serde_json::json!({ "id": id, "requeued": requeued }));
        }
    }
    Ok(())
}

async fn open_migrated(db: &DbConfig) -> anyhow::Result<Arc<dyn EventStore>> {
    let store = store::open(db).await.context("cannot open the database")?;
    store.migrate().await.context("cannot apply migrations")?;
    Ok(store)
}

async fn projects(db: &DbConfig, command: ProjectsCommand) -> anyhow::Result<()> {
    let store = open_migrated(db).await?;
    match command {
        ProjectsCommand::Add {
            name,
            origins,
            rate_limit,
        } => {
            anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
            let project = Project::new(name.trim(), origins, rate_limit);
            store.add_project(&project).await?;
            println!("{}", serde_json::to_string(&project)?);
        }
        ProjectsCommand::List => {
            println!("{}", serde_json::to_string(&store.list_projects().await?)?);
        }
        ProjectsCommand::Remove { name, id } => {
            let target = name.or(id).unwrap_or_default();
            anyhow::ensure!(
                store.remove_project(&target).await?,
                "no project named {target:?}"
            );
            eprintln!("removed project {target:?}");
        }
    }
    Ok(())
}

/// `serve`: migrate, keep partitions and batch receipts, answer requests until SIGTERM/SIGINT,
/// then drain.
pub async fn serve(db: &DbConfig, config: ServeConfig) -> anyhow::Result<()> {
    let store = open_migrated(db).await?;
    let shutdown = Shutdown::new();
    shutdown.on_os_signals();
    // The partitions of this month and the next are in place before the first request: a
    // batch is never routed to the default partition while its month's partition is being
    // attached (that insert would fail; it is retried and at worst answered 503).
    maintain_partitions(store.as_ref(), &config).await;
    let maintenance = tokio::spawn(keep_partitions(
        store.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    let rollups = tokio::spawn(crate::rollup::keep_drained(
        store.clone(),
        crate::rollup::DRAIN_INTERVAL,
        shutdown.clone(),
    ));
    let receipt_cleanup = tokio::spawn(receipts::keep_receipts(
        store.clone(),
        config.batch_receipt_ttl,
        shutdown.clone(),
    ));
    let backups = config.backup.clone().map(|backup| {
        tokio::spawn(export::keep_backups(
            store.clone(),
            backup,
            shutdown.clone(),
        ))
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown_timeout = config.shutdown_timeout;
    let limits = transport::Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
    };
    let queue = config.queue.clone();
    // Fails when the projects cannot be loaded: serving without them would refuse every key.
    let webhook_config = config.webhooks.clone();
    let (mut state, committer) = AppState::new(config, store.clone()).await?;
    let deliveries = match (webhook_config.disabled, store.deliveries()) {
        (false, Some(queue)) => Some(tokio::spawn(webhooks::worker::run(
            queue,
            webhook_config,
            state.ingest_pressure(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    if let Some(queue) = queue {
        tracing::info!(url = %queue.url, stream = %queue.stream, "publishing accepted events to the queue");
        state = state.with_publisher(Arc::new(EventPublisher::start(queue).await?));
    }
    let projects = state.projects();
    let health = state.ingest_health();
    tracing::info!(address = %listener.local_addr()?, backend = store.backend(), "listening");
    let upkeep = tokio::spawn(metrics::keep_histograms(shutdown.clone()));

    // Live views (Server-Sent Events) never end by themselves: end them when shutdown starts.
    let live = state.clone();
    let live_shutdown = shutdown.clone();
    tokio::spawn(async move {
        live_shutdown.wait().await;
        http::close_live_streams(&live);
    });
    let server = transport::serve(listener, http::router(state), limits, shutdown.clone());
    // In-flight requests get `shutdown_timeout` to finish once shutdown starts; then the
    // remaining connections are dropped with the server future.
    let deadline = async {
        shutdown.wait().await;
        tokio::time::sleep(shutdown_timeout).await;
    };
    tokio::select! {
        _ = server => {}
        _ = deadline => tracing::warn!("in-flight requests did not finish in time"),
    }
    upkeep.abort();
    // The router (and every handle on the committer) is gone: the committer commits what
    // is queued and stops.
    match tokio::time::timeout(shutdown_timeout, committer).await {
        Ok(_) => tracing::info!("commit queue drained; bye"),
        Err(_) => tracing::warn!("commit queue not drained in time"),
    }
    // The ingest health counts of the last requests (normally written once a second).
    health.flush(store.as_ref()).await;
    // The rollups of the last commits (another collector, or the next start, would count
    // them otherwise).
    let _ = rollups.await;
    if let Err(e) = store.drain_rollups().await {
        tracing::warn!(error = %e, "draining the rollup inbox at shutdown failed; it is kept");
    }
    projects.stop();
    maintenance.abort();
    receipt_cleanup.abort();
    if let Some(backups) = backups {
        backups.abort();
    }
    // The workers stopped claiming at shutdown and waited for their attempts in flight.
    if let Some(deliveries) = deliveries {
        let _ = tokio::time::timeout(shutdown_timeout, deliveries).await;
    }
    Ok(())
}

/// Creates upcoming partitions and drops expired ones every `partition_interval` (the first
/// run is [`serve`]'s, before listening).
async fn keep_partitions(store: Arc<dyn EventStore>, config: ServeConfig, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.partition_interval) => {}
            _ = shutdown.wait() => return,
        }
        maintain_partitions(store.as_ref(), &config).await;
    }
}

/// One round of partition upkeep; a failure is logged and retried at the next round.
async fn maintain_partitions(store: &dyn EventStore, config: &ServeConfig) {
    match store
        .maintain_partitions(
            Utc::now(),
            config.partition_months_ahead,
            config.retention_months,
        )
        .await
    {
        Ok(report) if report.created.is_empty() && report.dropped.is_empty() => {}
        Ok(report) => {
            tracing::info!(created = ?report.created, dropped = ?report.dropped, "partitions maintained")
        }
        Err(e) => tracing::warn!(error = %e, "partition maintenance failed; will retry"),
    }
}
