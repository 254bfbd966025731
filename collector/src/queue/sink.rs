//! `tracklet-collector sink`: pulls queue messages and commits them, acknowledging each only
//! after its rows (and its batch's receipt) are committed.
//!
//! Several sinks share one durable pull consumer, so JetStream spreads the messages over
//! them. Messages are committed through the same [`GroupCommitter`] as `serve` uses without
//! a queue (one transaction for the rows of many messages, dedupe by event id), so a message
//! delivered twice (a sink killed between commit and ack, an ack lost) stores nothing twice.
//! When the database is down, the failed messages are handed back with a delay (`NAK`),
//! the sink waits with a growing back-off before taking more, and everything not yet
//! committed stays in the stream until the database is back.
//!
//! `/readyz` and `/metrics` on `--listen` report the consumer's lag: messages not yet
//! delivered, delivered but not acknowledged, and the age of the oldest in the stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::record::QueueRecord;
use super::{ensure_stream, is_connected, QueueError};
use crate::commit::{CommitError, GroupCommitter};
use crate::config::{DbConfig, SinkConfig};
use crate::error::UNAVAILABLE_RETRY_AFTER_SECS;
use crate::metrics;
use crate::shutdown::Shutdown;

pub use super::Lag;
use crate::store::{self, EventStore};

/// How often each sink reads the consumer's lag (for `/metrics` and `/readyz`).
const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// First and longest wait after a failed commit before taking more messages.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Partition upkeep while sinking (creating months ahead; dropping is `serve`'s job).
const PARTITION_INTERVAL: Duration = Duration::from_secs(3600);

/// What the HTTP endpoints of a sink read.
struct SinkState {
    client: async_nats::Client,
    store: tokio::sync::OnceCell<Arc<dyn EventStore>>,
    lag: Mutex<Option<Lag>>,
    metrics: PrometheusHandle,
}

/// Growing pause after failed commits, reset by a successful one.
#[derive(Default)]
struct Backoff {
    state: Mutex<(Option<Instant>, Duration)>,
}

impl Backoff {
    fn failed(&self) -> Duration {
        let Ok(mut state) = self.state.lock() else {
            return BACKOFF_FIRST;
        };
        let delay = (state.1 * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        *state = (Some(Instant::now() + delay), delay);
        delay
    }

    fn succeeded(&self) {
        if let Ok(mut state) = self.state.lock() {
            *state = (None, Duration::ZERO);
        }
    }

    /// Waits out the current pause (if any).
    async fn wait(&self) {
        let until = self.state.lock().ok().and_then(|s| s.0);
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// Runs a sink until SIGTERM/SIGINT; in-flight messages are committed and acknowledged before
/// it exits (those it held but had not started are delivered again after `--ack-wait-secs`).
pub async fn run(db: &DbConfig, config: SinkConfig) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown.on_os_signals();
    let client = super::connect(&config.queue, "tracklet-sink").await?;
    let state = Arc::new(SinkState {
        client: client.clone(),
        store: tokio::sync::OnceCell::new(),
        lag: Mutex::new(None),
        metrics: metrics::install(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(address = %listener.local_addr()?, stream = %config.queue.stream, consumer = %config.consumer, "sink listening");
    let http = tokio::spawn({
        let shutdown = shutdown.clone();
        let app = routes(state.clone());
        async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.wait().await })
                .await;
        }
    });
    let upkeep = tokio::spawn(metrics::keep_histograms(shutdown.clone()));

    let Some(store) = open_store(db, &shutdown).await else {
        return Ok(());
    };
    let _ = state.store.set(store.clone());
    let partitions = tokio::spawn(keep_partitions(
        store.clone(),
        config.partition_months_ahead,
        shutdown.clone(),
    ));
    let rollups = tokio::spawn(crate::rollup::keep_drained(
        store.clone(),
        crate::rollup::DRAIN_INTERVAL,
        shutdown.clone(),
    ));
    let js = jetstream::new(client.clone());
    let Some(consumer) = open_consumer(&js, &config, &shutdown).await else {
        return Ok(());
    };
    let lag = tokio::spawn(watch_lag(
        js.clone(),
        config.clone(),
        state.clone(),
        shutdown.clone(),
    ));

    let (committer, commit_task) = GroupCommitter::start(store, config.commit.clone());
    consume(consumer, &config, committer, &shutdown).await;
    match tokio::time::timeout(config.shutdown_timeout, commit_task).await {
        Ok(_) => tracing::info!("in-flight messages committed"),
        Err(_) => {
            tracing::warn!("in-flight messages not committed in time; they will be delivered again")
        }
    }
    // Acknowledgements are sent before the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    upkeep.abort();
    lag.abort();
    partitions.abort();
    rollups.abort();
    let _ = http.await;
    tracing::info!("sink stopped; bye");
    Ok(())
}

/// Opens and migrates the store, retrying while the database is down (a sink started before
/// its database waits for it). `None` when shutdown came first.
async fn open_store(db: &DbConfig, shutdown: &Shutdown) -> Option<Arc<dyn EventStore>> {
    let mut delay = BACKOFF_FIRST;
    loop {
        let attempt = async {
            let store = store::open(db).await?;
            store.migrate().await?;
            Ok::<_, store::StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Some(store),
            Err(e) => tracing::warn!(error = %e, "cannot open the database yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => return None,
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

async fn keep_partitions(store: Arc<dyn EventStore>, months_ahead: u32, shutdown: Shutdown) {
    loop {
        match store.maintain_partitions(Utc::now(), months_ahead, 0).await {
            Ok(report) if !report.created.is_empty() => {
                tracing::info!(created = ?report.created, "partitions created")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "partition maintenance failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PARTITION_INTERVAL) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// The shared durable consumer's configuration.
fn consumer_config(config: &SinkConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some("Tracklet sinks: commit events to the database".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        // Redelivered until committed: a database outage must not lose events.
        max_deliver: -1,
        // Bounds what all sinks together hold uncommitted.
        max_ack_pending: (config.max_inflight_messages.max(1) * 16) as i64,
        ..Default::default()
    }
}

/// Gets (creating when missing) the stream and the durable consumer, retrying while NATS is
/// down. `None` when shutdown came first.
async fn open_consumer(
    js: &jetstream::Context,
    config: &SinkConfig,
    shutdown: &Shutdown,
) -> Option<PullConsumer> {
    let mut delay = BACKOFF_FIRST;
    loop {
        let attempt = async {
            let stream = ensure_stream(js, &config.queue).await?;
            stream
                .get_or_create_consumer::<pull::Config>(&config.consumer, consumer_config(config))
                .await
                .map_err(|e| QueueError::Failed(format!("consumer {}: {e}", config.consumer)))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(consumer)) => return Some(consumer),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot open the queue consumer yet; retrying")
            }
            Err(_) => tracing::warn!("opening the queue consumer timed out; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => return None,
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// Pulls messages and hands each to a task that commits and acknowledges it, at most
/// `max_inflight_messages` at a time, until shutdown; then waits for those tasks.
async fn consume(
    consumer: PullConsumer,
    config: &SinkConfig,
    committer: GroupCommitter,
    shutdown: &Shutdown,
) {
    let inflight = Arc::new(Semaphore::new(config.max_inflight_messages.max(1)));
    let backoff = Arc::new(Backoff::default());
    let mut tasks = tokio::task::JoinSet::new();
    'pulling: while !shutdown.is_triggered() {
        let messages = consumer
            .stream()
            .max_messages_per_batch(config.fetch_max_messages.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the queue; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.wait() => break,
                }
            }
        };
        loop {
            while tasks.try_join_next().is_some() {}
            let next = tokio::select! {
                next = messages.next() => next,
                _ = shutdown.wait() => break 'pulling,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    // Missed heartbeats while NATS is away, a deleted consumer: pull anew.
                    tracing::warn!(error = %e, "pulling from the queue failed; pulling anew");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pulling,
                        _ = shutdown.wait() => break 'pulling,
                    }
                }
                None => continue 'pulling,
            };
            backoff.wait().await;
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break 'pulling;
            };
            tasks.spawn(sink_message(
                message,
                committer.clone(),
                backoff.clone(),
                permit,
            ));
        }
    }
    drop(committer);
    let deadline = tokio::time::sleep(config.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!(left = tasks.len(), "messages still being committed at the shutdown deadline");
                break;
            }
        }
    }
}

/// Commits one message's rows and receipt, then acknowledges it; hands it back with a delay
/// when the commit failed for the server's reasons; terminates it when it can never be stored.
async fn sink_message(
    message: jetstream::Message,
    committer: GroupCommitter,
    backoff: Arc<Backoff>,
    _permit: OwnedSemaphorePermit,
) {
    let result = loop {
        let decoded = QueueRecord::decode(&message.payload).and_then(QueueRecord::into_rows);
        let (rows, receipt) = match decoded {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::error!(error = %e, subject = %message.subject, "unreadable queue message; terminating it");
                metrics::sink_messages("unreadable", 1);
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        match committer.commit(rows, receipt).await {
            // The commit queue is bounded in rows and bytes; the in-flight messages may hold
            // more for a moment. Not a database failure: wait for room (the rows are read
            // again from the message, which `commit` consumed them from).
            Err(CommitError::QueueFull) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => break other,
        }
    };
    match result {
        Ok(inserted) => {
            backoff.succeeded();
            let stored = inserted.iter().filter(|new| **new).count() as u64;
            metrics::sink_events(stored, inserted.len() as u64 - stored);
            metrics::sink_messages("committed", 1);
            // A lost ack means a redelivery, which the dedupe by event id absorbs.
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "cannot acknowledge a committed message; it will be delivered again");
            }
        }
        Err(CommitError::Refused(e)) => {
            // The database refuses this data itself (validation should have caught it): the
            // same rows would fail forever. Logged with the subject for the operator.
            tracing::error!(error = %e, subject = %message.subject, "the database refused a queue message's rows; terminating it");
            metrics::sink_messages("refused", 1);
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(CommitError::Stopped) => {
            // Shutting down: hand it back for another sink at once.
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        Err(e) => {
            let delay = backoff.failed();
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "commit failed; the message will be delivered again");
            metrics::sink_messages("retried", 1);
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }
}

/// Reads the lag every [`LAG_INTERVAL`] into the metrics and the state `/readyz` shows.
async fn watch_lag(
    js: jetstream::Context,
    config: SinkConfig,
    state: Arc<SinkState>,
    shutdown: Shutdown,
) {
    loop {
        let lag = tokio::time::timeout(Duration::from_secs(2), read_lag(&js, &config)).await;
        let lag = match lag {
            Ok(Ok(lag)) => {
                metrics::queue_lag(
                    lag.pending,
                    lag.ack_pending,
                    Duration::from_secs_f64(lag.oldest_pending_secs),
                );
                Some(lag)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the queue's lag");
                None
            }
            Err(_) => None,
        };
        if let Ok(mut last) = state.lag.lock() {
            *last = lag;
        }
        tokio::select! {
            _ = tokio::time::sleep(LAG_INTERVAL) => {}
            _ = shutdown.wait() => return,
        }
    }
}

async fn read_lag(js: &jetstream::Context, config: &SinkConfig) -> Result<Lag, QueueError> {
    super::read_lag(js, &config.queue.stream, &config.consumer).await
}

fn routes(state: Arc<SinkState>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// Ready when connected to NATS and the database answers; the body carries the lag.
async fn readyz(State(state): State<Arc<SinkState>>) -> Response {
    let queue_ok = is_connected(&state.client);
    let database = match state.store.get() {
        None => Err("not opened yet".to_owned()),
        Some(store) => match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("database ping timed out".to_owned()),
        },
    };
    let ready = queue_ok && database.is_ok();
    let lag = state.lag.lock().ok().and_then(|lag| *lag);
    let body = Json(serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "queue": if queue_ok { "ok" } else { "unreachable" },
        "database": database.err().unwrap_or_else(|| "ok".to_owned()),
        "lag": lag,
    }));
    if ready {
        (StatusCode::OK, body).into_response()
    } else {
        let retry = [(
            header::RETRY_AFTER,
            UNAVAILABLE_RETRY_AFTER_SECS.to_string(),
        )];
        (StatusCode::SERVICE_UNAVAILABLE, retry, body).into_response()
    }
}

async fn render_metrics(State(state): State<Arc<SinkState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
