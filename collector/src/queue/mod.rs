//! The queue past one machine: collectors publish accepted events to a NATS JetStream stream
//! ([`publisher`]) and answer once JetStream has acknowledged them; sinks ([`sink`]) pull
//! them, group-commit them into the store with the same dedupe by event id, and acknowledge
//! them only after the commit.
//!
//! JetStream is the durable, replicated log between ingest and storage (PostHog and Jitsu use
//! Kafka for the same place): the edge keeps accepting while the database is slow or away,
//! and sinks scale on their own. This module owns the connection, the stream's shape
//! ([`stream_config`]) and the errors; [`record`] owns what a message holds.
//!
//! The stream keeps only what no sink has committed yet (work-queue retention) and refuses
//! new messages when full (discard new): a full stream is a 503 at the edge, never the
//! silent loss of acknowledged events.

pub mod publisher;
pub mod record;
pub mod sink;

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, stream};
use chrono::Utc;
use serde::Serialize;

use crate::config::QueueConfig;

/// Why the queue could not take or give events. Every case is the server side's: the
/// collector answers 503 with `Retry-After` (the SDK keeps the events and sends them again).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No connection to NATS now (down, or reconnecting).
    #[error("the queue is unreachable ({0})")]
    Unreachable(String),
    /// The stream is at its `--queue-max-bytes` (sinks are behind) or the server is out of
    /// storage.
    #[error("the queue is full: {0}")]
    Full(String),
    /// JetStream did not acknowledge within `--queue-publish-timeout-ms`.
    #[error("the queue did not acknowledge in time")]
    Timeout,
    /// The stream is missing and cannot be created, or JetStream answered with an error.
    #[error("the queue failed: {0}")]
    Failed(String),
    /// A message could not be encoded (a bug; never the client's fault).
    #[error("cannot encode the queue message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Connects to NATS without waiting: the client keeps trying in the background (and
/// reconnects after a loss), so a collector or sink starts while NATS is down and works as
/// soon as it is up. Until then publishes fail at once with [`QueueError::Unreachable`].
pub async fn connect(config: &QueueConfig, name: &str) -> Result<async_nats::Client, QueueError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        // Reconnect attempts 0.1 s apart at first, then at most every 2 s.
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((100 * attempt.max(1) as u64).min(2000))
        })
        .connect(servers(&config.url))
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))
}

/// The servers of `--queue`: one URL, or several separated by commas (a cluster's seeds;
/// the client learns the other nodes from the first it reaches).
fn servers(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// True while the client has a live connection to a NATS server.
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// The subject of a project's events: `<prefix>.<project id>`.
pub fn subject(config: &QueueConfig, project_id: uuid::Uuid) -> String {
    format!("{}.{}", config.subject_prefix, project_id)
}

/// The stream every collector and sink agrees on (either creates it when missing).
pub fn stream_config(config: &QueueConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        // A message is removed once a sink acknowledges it: the stream holds the backlog,
        // and `max_bytes` bounds the backlog, not history.
        retention: stream::RetentionPolicy::WorkQueue,
        // Full means refuse new messages (503 at the edge), never drop old acknowledged ones.
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: config.replicas.max(1),
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        duplicate_window: config.duplicate_window,
        description: Some("Tracklet events accepted by collectors, not yet committed".into()),
        ..Default::default()
    }
}

/// Gets the stream, creating it when missing. An existing stream is used as it is (an
/// operator may have changed its limits with the `nats` CLI); a mismatch is only logged.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &QueueConfig,
) -> Result<stream::Stream, QueueError> {
    let wanted = stream_config(config);
    let stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| QueueError::Failed(format!("stream {}: {e}", config.stream)))?;
    let existing = &stream.cached_info().config;
    if existing.subjects != wanted.subjects
        || existing.retention != wanted.retention
        || existing.discard != wanted.discard
    {
        tracing::warn!(
            stream = %config.stream,
            subjects = ?existing.subjects,
            "the existing stream's subjects, retention or discard policy differ from this configuration's; using it as it is"
        );
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_is_given_as_comma_separated_urls() {
        assert_eq!(servers("nats://127.0.0.1:4222"), ["nats://127.0.0.1:4222"]);
        assert_eq!(
            servers("nats://a:4222, nats://b:4222,,nats://c:4222"),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
    }
}

/// How far the sinks are behind (`/readyz` and `/metrics` of a sink, the ingest health of
/// `serve --queue`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Lag {
    /// Messages in the stream not yet delivered to any sink.
    pub pending: u64,
    /// Messages delivered to a sink and not yet acknowledged (being committed, or waiting
    /// for redelivery after a failed commit).
    pub ack_pending: u64,
    /// Messages in the stream: everything not yet committed (work-queue retention).
    pub stream_messages: u64,
    /// Age of the oldest message in the stream, in seconds (0 when empty).
    pub oldest_pending_secs: f64,
}

/// The consumer's lag: what the sinks sharing `consumer` have not committed yet.
pub async fn read_lag(
    js: &jetstream::Context,
    stream_name: &str,
    consumer: &str,
) -> Result<Lag, QueueError> {
    let failed = |e: &dyn std::fmt::Display| QueueError::Failed(e.to_string());
    let mut stream = js.get_stream(stream_name).await.map_err(|e| failed(&e))?;
    let stream_state = stream.info().await.map_err(|e| failed(&e))?.state.clone();
    let mut consumer: PullConsumer = stream
        .get_consumer(consumer)
        .await
        .map_err(|e| failed(&e))?;
    let info = consumer.info().await.map_err(|e| failed(&e))?;
    let oldest_pending_secs = if stream_state.messages > 0 {
        let now = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let first = stream_state.first_timestamp.unix_timestamp_nanos();
        ((i128::from(now) - first).max(0) as f64) / 1e9
    } else {
        0.0
    };
    Ok(Lag {
        pending: info.num_pending,
        ack_pending: info.num_ack_pending as u64,
        stream_messages: stream_state.messages,
        oldest_pending_secs,
    })
}
