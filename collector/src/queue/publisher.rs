//! `serve --queue`: the collector's side of the queue. A batch's accepted events are
//! published to the project's subject and the request is answered only once JetStream has
//! acknowledged every part (stored, and replicated to a quorum with R3), so a 200 means
//! "durable in the stream" as it means "committed" without a queue.
//!
//! Every failure (no connection, stream full, no acknowledgement in time) is a
//! [`QueueError`], answered 503 with `Retry-After`: the SDK keeps the events and sends the
//! batch again, and the message ids plus the sinks' dedupe store it once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_nats::jetstream::{self, context::PublishErrorKind};
use futures_util::future::try_join_all;
use uuid::Uuid;

use super::record::QueueRecord;
use super::{ensure_stream, is_connected, subject, QueueError};
use crate::config::QueueConfig;
use crate::metrics;
use crate::store::{BatchReceipt, EventRow};

/// Room left in a message for the headers and the protocol line, under `max_payload`.
const HEADER_ROOM: usize = 4 * 1024;
/// Longest wait at start for the first connection to NATS.
const STARTUP_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Events now in the stream (acknowledged by JetStream).
    pub events: u64,
    /// Events JetStream already had under the same message id (a batch sent again within
    /// the duplicate window): they are in the stream once.
    pub duplicates: u64,
}

/// The collector's handle on the stream; shared by all requests.
pub struct EventPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    config: QueueConfig,
    /// Set once the stream is known to exist (created if missing); cleared when a publish
    /// finds no stream, so it is created again.
    stream_ready: AtomicBool,
    ensure_lock: tokio::sync::Mutex<()>,
}

impl EventPublisher {
    /// Connects in the background (see [`super::connect`]): never fails because NATS is
    /// down; requests get 503 until it is up.
    pub async fn start(config: QueueConfig) -> Result<EventPublisher, QueueError> {
        let client = super::connect(&config, "tracklet-collector").await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .build(client.clone());
        let publisher = EventPublisher {
            client,
            js,
            config,
            stream_ready: AtomicBool::new(false),
            ensure_lock: tokio::sync::Mutex::new(()),
        };
        // Give the first connection a moment, so a collector whose NATS is up serves its
        // first request; a NATS still down after that is a 503 per request until it is up.
        let connecting = tokio::time::Instant::now() + STARTUP_CONNECT_WAIT;
        while !publisher.is_connected() && tokio::time::Instant::now() < connecting {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Create the stream now when NATS is up already; otherwise at the first publish.
        if publisher.is_connected() {
            if let Err(e) = publisher.ready_stream().await {
                tracing::warn!(error = %e, "cannot set up the queue's stream yet; will retry at the first batch");
            }
        }
        Ok(publisher)
    }

    /// True while connected to NATS (`/readyz`).
    pub fn is_connected(&self) -> bool {
        is_connected(&self.client)
    }

    /// How far the sinks sharing `consumer` are behind; `None` when it cannot be read within
    /// a second (NATS away, no sink has created the consumer yet).
    pub async fn lag(&self, consumer: &str) -> Option<super::Lag> {
        let read = super::read_lag(&self.js, &self.config.stream, consumer);
        match tokio::time::timeout(std::time::Duration::from_secs(1), read).await {
            Ok(Ok(lag)) => Some(lag),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the queue's lag");
                None
            }
            Err(_) => None,
        }
    }

    /// The stream's name (`/readyz`).
    pub fn stream_name(&self) -> &str {
        &self.config.stream
    }

    async fn ready_stream(&self) -> Result<(), QueueError> {
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.ensure_lock.lock().await;
        if !self.stream_ready.load(Ordering::Acquire) {
            tokio::time::timeout(
                self.config.publish_timeout,
                ensure_stream(&self.js, &self.config),
            )
            .await
            .map_err(|_| QueueError::Timeout)??;
            self.stream_ready.store(true, Ordering::Release);
            tracing::info!(stream = %self.config.stream, "queue stream ready");
        }
        Ok(())
    }

    /// Publishes the batch's `rows` and `receipt` and returns once JetStream has
    /// acknowledged every part.
    pub async fn publish(
        &self,
        project_id: Uuid,
        rows: Vec<EventRow>,
        receipt: Option<BatchReceipt>,
    ) -> Result<Published, QueueError> {
        if rows.is_empty() && receipt.is_none() {
            return Ok(Published {
                events: 0,
                duplicates: 0,
            });
        }
        let started = Instant::now();
        let result = self.publish_record(project_id, rows, receipt).await;
        metrics::queue_published(started.elapsed(), result.as_ref().err());
        result
    }

    async fn publish_record(
        &self,
        project_id: Uuid,
        rows: Vec<EventRow>,
        receipt: Option<BatchReceipt>,
    ) -> Result<Published, QueueError> {
        // Fail at once rather than queue the message in the client until the timeout.
        if !self.is_connected() {
            return Err(QueueError::Unreachable(format!(
                "not connected to {}",
                self.config.url
            )));
        }
        self.ready_stream().await?;
        let max_payload = (self.client.server_info().max_payload)
            .saturating_sub(HEADER_ROOM)
            .max(HEADER_ROOM);
        let parts = QueueRecord::new(project_id, rows, receipt).encode_parts(max_payload)?;
        let subject = subject(&self.config, project_id);
        let acks = parts.into_iter().map(|part| {
            let subject = subject.clone();
            async move {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(part.payload)
                    .message_id(part.msg_id);
                let ack = self
                    .js
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| self.publish_error(e.kind(), e.to_string()))?
                    .await
                    .map_err(|e| self.publish_error(e.kind(), e.to_string()))?;
                Ok::<_, QueueError>((part.events as u64, ack.duplicate))
            }
        });
        let acked = try_join_all(acks).await?;
        let mut published = Published {
            events: 0,
            duplicates: 0,
        };
        for (events, duplicate) in acked {
            if duplicate {
                published.duplicates += events;
            } else {
                published.events += events;
            }
        }
        Ok(published)
    }

    fn publish_error(&self, kind: PublishErrorKind, message: String) -> QueueError {
        match kind {
            PublishErrorKind::TimedOut => QueueError::Timeout,
            PublishErrorKind::StreamNotFound => {
                // Deleted under us (or never created): create it again at the next batch.
                self.stream_ready.store(false, Ordering::Release);
                QueueError::Failed(message)
            }
            PublishErrorKind::BrokenPipe => QueueError::Unreachable(message),
            // JetStream's own refusals: "maximum bytes exceeded", "maximum messages
            // exceeded", "insufficient resources" (error codes 10047, 10054, 10077).
            _ if is_full(&message) => QueueError::Full(message),
            _ => QueueError::Failed(message),
        }
    }
}

/// Whether JetStream's error text says the stream (or the server's storage) is full.
fn is_full(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("maximum bytes")
        || m.contains("maximum messages")
        || m.contains("insufficient resources")
        || m.contains("storage")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_streams_are_told_apart() {
        assert!(is_full(
            "nats: maximum bytes exceeded (code 503, error code 10077)"
        ));
        assert!(is_full("insufficient resources"));
        assert!(!is_full("no responders"));
    }
}
