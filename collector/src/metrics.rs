//! Prometheus metrics: names and labels in one place, recorded through the `metrics` facade.
//!
//! The recorder is installed once per process (tests build many routers in one process);
//! `GET /metrics` renders it.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::Method;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::shutdown::Shutdown;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (first call) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; the handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// How often histogram upkeep runs while serving (see [`keep_histograms`]).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the recorder's upkeep (drains histogram buckets into their summaries, so they do not
/// grow between scrapes) every few seconds until `shutdown` fires.
pub async fn keep_histograms(shutdown: Shutdown) {
    let handle = install();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(UPKEEP_INTERVAL) => handle.run_upkeep(),
            _ = shutdown.wait() => return,
        }
    }
}

/// The `method` label: a fixed set, so made-up methods cannot create new series.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// A request answered. `route` is the matched route pattern or "other" (bounded too).
pub fn request_finished(route: &str, method: &Method, status: u16, elapsed: Duration) {
    let labels = [
        ("route", route.to_owned()),
        ("method", method_label(method).to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("tracklet_http_requests_total", &labels).increment(1);
    metrics::histogram!("tracklet_http_request_duration_seconds", &labels[..2])
        .record(elapsed.as_secs_f64());
}

pub fn batch_received(events: usize) {
    metrics::histogram!("tracklet_batch_events").record(events as f64);
}

pub fn events_accepted(n: u64) {
    metrics::counter!("tracklet_events_total", "outcome" => "accepted").increment(n);
}

pub fn events_duplicate(n: u64) {
    metrics::counter!("tracklet_events_total", "outcome" => "duplicate").increment(n);
}

pub fn event_rejected(reason: &'static str) {
    metrics::counter!("tracklet_events_total", "outcome" => "rejected", "reason" => reason)
        .increment(1);
}

pub fn commit_finished(elapsed: Duration, rows: usize, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::histogram!("tracklet_commit_duration_seconds", "outcome" => outcome)
        .record(elapsed.as_secs_f64());
    metrics::histogram!("tracklet_commit_rows").record(rows as f64);
}

pub fn queue_depth(rows: usize) {
    metrics::gauge!("tracklet_commit_queue_rows").set(rows as f64);
}

/// Events the SDK reports having dropped (its queue was full) before this batch.
pub fn sdk_dropped(n: u64) {
    metrics::counter!("tracklet_sdk_dropped_events_total").increment(n);
}

/// A batch status query answered: `asked` distinct usable ids, `arrived` of them with a
/// receipt (the others: `not_found`).
pub fn batch_status_answered(asked: usize, arrived: usize) {
    metrics::counter!("tracklet_batch_status_queries_total").increment(1);
    metrics::counter!("tracklet_batch_status_ids_total", "outcome" => "arrived")
        .increment(arrived as u64);
    metrics::counter!("tracklet_batch_status_ids_total", "outcome" => "not_found")
        .increment(asked.saturating_sub(arrived) as u64);
}

/// Batch receipts deleted for being older than `--batch-receipt-ttl-days`.
pub fn receipts_expired(n: u64) {
    metrics::counter!("tracklet_batch_receipts_expired_total").increment(n);
}

/// A batch published to the queue (`serve --queue`): how long JetStream took to acknowledge,
/// and the outcome (`ok`, or why it failed).
pub fn queue_published(elapsed: Duration, error: Option<&crate::queue::QueueError>) {
    use crate::queue::QueueError as E;
    let outcome = match error {
        None => "ok",
        Some(E::Unreachable(_)) => "unreachable",
        Some(E::Full(_)) => "full",
        Some(E::Timeout) => "timeout",
        Some(E::Failed(_) | E::Encode(_)) => "failed",
    };
    metrics::counter!("tracklet_queue_publishes_total", "outcome" => outcome).increment(1);
    metrics::histogram!("tracklet_queue_publish_duration_seconds", "outcome" => outcome)
        .record(elapsed.as_secs_f64());
}

/// Queue messages a sink has finished with: `committed` (acknowledged), `retried` (the
/// commit failed; redelivered later), `refused` (the database refused the data) or
/// `unreadable` (not a record this sink reads); the last two are terminated.
pub fn sink_messages(outcome: &'static str, n: u64) {
    metrics::counter!("tracklet_sink_messages_total", "outcome" => outcome).increment(n);
}

/// Events a sink committed: newly stored, or already stored (a redelivery, a resend).
pub fn sink_events(stored: u64, duplicates: u64) {
    metrics::counter!("tracklet_sink_events_total", "outcome" => "stored").increment(stored);
    metrics::counter!("tracklet_sink_events_total", "outcome" => "duplicate").increment(duplicates);
}

/// The consumer's lag, refreshed every few seconds by each sink: messages in the stream
/// not yet committed (`pending`: not yet delivered; `ack_pending`: delivered, not yet
/// acknowledged) and the age of the oldest.
pub fn queue_lag(pending: u64, ack_pending: u64, oldest_age: Duration) {
    metrics::gauge!("tracklet_queue_pending_messages").set(pending as f64);
    metrics::gauge!("tracklet_queue_ack_pending_messages").set(ack_pending as f64);
    metrics::gauge!("tracklet_queue_oldest_pending_seconds").set(oldest_age.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_a_fixed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        assert_eq!(method_label(&Method::HEAD), "HEAD");
        assert_eq!(method_label(&Method::PUT), "other");
        let made_up = Method::from_bytes(b"BREW").expect("a valid token");
        assert_eq!(method_label(&made_up), "other");
    }
}
