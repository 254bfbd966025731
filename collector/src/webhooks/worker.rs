//! Delivery workers: claim due deliveries, send them, record what happened.
//!
//! One loop per collector ([`run`]) claims up to its free slots every poll interval (or at
//! once when an attempt ends), each claimed delivery is sent on a task of its own, and the
//! outcome is written back (by the loop, with the next claim) only while the claim's lease
//! still holds. Retries follow
//! [`WebhookConfig::retry_schedule`] with jitter, or the destination's `Retry-After` on 429
//! and 503; a 410 disables the destination. Sending is at least once: a delivery whose
//! answer was lost (a crash after sending) is sent again, with the same `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::destinations::{self, GuardedResolver};
use super::signing;
use super::{Claimed, DeliveryStore, Finish, Outcome, WebhookConfig};
use crate::commit::IngestPressure;
use crate::shutdown::Shutdown;

/// Bytes of a destination's answer read (for the last error); the rest is never read.
pub const RESPONSE_CAP: usize = 4096;
/// Characters of an answer kept as the last error.
const ERROR_CHARS: usize = 300;
/// How often the queue depth gauge is refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);
/// How often delivered deliveries past their retention are deleted.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What an attempt got back.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// `Retry-After` of a 429 or 503.
    pub retry_after: Option<Duration>,
    /// What went wrong, when it did (transport error, or the status and the answer's start).
    pub error: Option<String>,
}

/// The recorded outcome of attempt number `attempt` (from 1), given the schedule; `jitter`
/// in [0, 1) spreads retries over ±20% of the scheduled wait.
pub fn decide(
    attempt: u32,
    result: &Attempt,
    schedule: &[Duration],
    now: DateTime<Utc>,
    jitter: f64,
) -> Finish {
    let error = result.error.clone().unwrap_or_default();
    match result.status {
        Some(s) if (200..300).contains(&s) => return Finish::Delivered { status: s },
        Some(410) => return Finish::Gone { error },
        _ => {}
    }
    let Some(wait) = schedule.get(attempt.saturating_sub(1) as usize) else {
        return Finish::Failed {
            status: result.status,
            error,
        };
    };
    let wait = match result.retry_after {
        Some(after) => after.min(MAX_RETRY_AFTER),
        None => wait.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)),
    };
    Finish::Retry {
        at: now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(10)),
        status: result.status,
        error,
    }
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `{"type":"events.committed","timestamp":...,"data":{"project":...,"events":[...]}}`: the
/// same bytes on every attempt. The events are the JSON array the outbox encoded (compact,
/// by serde), copied in as they are rather than parsed again (50 KB for 100 events).
pub fn body(claimed: &Claimed) -> Result<Vec<u8>, String> {
    let timestamp = claimed
        .created_at
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut out = Vec::with_capacity(claimed.events.len() + claimed.project.len() + 96);
    out.extend_from_slice(br#"{"type":"events.committed","timestamp":""#);
    out.extend_from_slice(timestamp.as_bytes());
    out.extend_from_slice(br#"","data":{"project":"#);
    serde_json::to_writer(&mut out, &claimed.project).map_err(|e| e.to_string())?;
    out.extend_from_slice(br#","events":"#);
    out.extend_from_slice(claimed.events.as_bytes());
    out.extend_from_slice(b"}}");
    Ok(out)
}

/// The HTTP client deliveries are sent with: no redirects, a timeout per attempt, and
/// (unless private destinations are allowed) a resolver refusing private addresses.
pub fn client(config: &WebhookConfig) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Straight to the destination: a proxy from the environment would bypass the
        // address checks of the resolver below.
        .no_proxy()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .user_agent(concat!("tracklet-webhooks/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(config.concurrency as usize);
    let builder = if config.allow_private {
        builder
    } else {
        builder.dns_resolver(Arc::new(GuardedResolver))
    };
    builder.build()
}

/// Sends one attempt of `claimed`.
pub async fn attempt(client: &reqwest::Client, claimed: &Claimed, allow_private: bool) -> Attempt {
    let failed = |error: String| Attempt {
        status: None,
        retry_after: None,
        error: Some(error),
    };
    let url = match destinations::parse_url(&claimed.url) {
        Ok(url) => url,
        Err(e) => return failed(e.to_string()),
    };
    if !allow_private {
        if let Some(refusal) = destinations::refused_literal(&url) {
            return failed(refusal.to_string());
        }
    }
    let body = match body(claimed) {
        Ok(body) => body,
        Err(e) => return failed(format!("cannot build the body: {e}")),
    };
    let keys: Vec<Vec<u8>> = claimed
        .secrets
        .iter()
        .filter_map(|s| signing::decode_secret(s).ok())
        .collect();
    let msg_id = super::message_id(claimed.id);
    let timestamp = Utc::now().timestamp();
    let signature = match signing::signature_header(&keys, &msg_id, timestamp, &body) {
        Ok(signature) if !keys.is_empty() => signature,
        _ => return failed("the destination's secret is unusable".into()),
    };
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(e) => return failed(error_chain(&e)),
    };
    let status = response.status().as_u16();
    let retry_after = if status == 429 || status == 503 {
        response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
    } else {
        None
    };
    // Only the start of the answer is read, for the error message.
    let mut head = Vec::new();
    while head.len() < RESPONSE_CAP {
        match response.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let error = (!(200..300).contains(&status)).then(|| {
        let text: String = String::from_utf8_lossy(&head)
            .chars()
            .take(ERROR_CHARS)
            .collect();
        format!("HTTP {status}: {}", text.trim())
    });
    Attempt {
        status: Some(status),
        retry_after,
        error,
    }
}

/// An error and its causes on one line (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A delivery attempt finished, by outcome (`delivered`, `retry`, `failed`, `gone`).
fn count_outcome(finish: &Finish) {
    let result = match finish {
        Finish::Delivered { .. } => "delivered",
        Finish::Retry { .. } => "retry",
        Finish::Failed { .. } => "failed",
        Finish::Gone { .. } => "gone",
    };
    metrics::counter!("tracklet_deliveries_total", "result" => result).increment(1);
}

/// Sends `claimed` once; the outcome, to record.
async fn deliver(client: &reqwest::Client, config: &WebhookConfig, claimed: Claimed) -> Outcome {
    let result = attempt(client, &claimed, config.allow_private).await;
    let now = Utc::now();
    let jitter = rand::rng().random::<f64>();
    let finish = decide(
        claimed.attempt,
        &result,
        &config.retry_schedule,
        now,
        jitter,
    );
    count_outcome(&finish);
    if let Finish::Gone { .. } = finish {
        tracing::warn!(destination = %claimed.destination_id, "destination answered 410 Gone: disabled");
    }
    Outcome::of(&claimed, now, finish)
}

/// Outcomes not recorded for this long are dropped: their leases have run out (or nearly),
/// so the deliveries are claimed and sent again anyway.
fn stale(outcome: &Outcome, lease: Duration) -> bool {
    let age = Utc::now() - outcome.at;
    age.to_std().is_ok_and(|age| age >= lease)
}

/// Records the outcomes that came in, claims up to `free` deliveries; on an error the
/// outcomes are kept for the next round (while their leases last).
async fn round(
    store: &dyn DeliveryStore,
    config: &WebhookConfig,
    owner: Uuid,
    outcomes: &mut Vec<Outcome>,
    free: u32,
) -> Vec<Claimed> {
    match store
        .finish_and_claim(
            outcomes,
            owner,
            Utc::now(),
            free,
            config.concurrency,
            config.lease,
        )
        .await
    {
        Ok((recorded, claimed)) => {
            for (outcome, _) in outcomes.iter().zip(recorded).filter(|(_, done)| !done) {
                tracing::warn!(delivery = %outcome.delivery, "delivery lease expired before its outcome was recorded; it will be sent again");
            }
            outcomes.clear();
            claimed
        }
        Err(e) => {
            tracing::warn!(error = %e, outcomes = outcomes.len(), "cannot record delivery outcomes or claim deliveries; will retry");
            outcomes.retain(|o| !stale(o, config.lease));
            Vec::new()
        }
    }
}

/// Claims and sends deliveries until `shutdown`, then waits (at most one attempt's timeout)
/// for the attempts in flight and records their outcomes.
///
/// Each attempt runs on a task of its own and hands its outcome back to this loop, which
/// records every outcome that came in and claims for the free slots in one call
/// ([`DeliveryStore::finish_and_claim`]): one transaction per round rather than a claim and
/// an outcome per delivery.
///
/// While `pressure` is high (ingest saturated), at most `busy_deliveries` attempts start per
/// poll interval (and at most that many run): the deliveries wait in the queue, a trickle
/// still goes out, and they catch up once the requests no longer wait for their commits.
pub async fn run(
    store: Arc<dyn DeliveryStore>,
    config: WebhookConfig,
    pressure: IngestPressure,
    shutdown: Shutdown,
) {
    let client = match client(&config) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; no deliveries");
            return;
        }
    };
    let config = Arc::new(config);
    let owner = Uuid::new_v4();
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1) as usize));
    let wake = Arc::new(Notify::new());
    let (done, mut finished) = mpsc::unbounded_channel::<Outcome>();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut tasks = JoinSet::new();
    let (mut next_gauge, mut next_cleanup, mut next_busy_claim) = (
        tokio::time::Instant::now(),
        tokio::time::Instant::now(),
        tokio::time::Instant::now(),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = wake.notified() => {}
            _ = shutdown.wait() => break,
        }
        while tasks.try_join_next().is_some() {}
        while let Ok(outcome) = finished.try_recv() {
            outcomes.push(outcome);
        }
        let now = tokio::time::Instant::now();
        if now >= next_gauge {
            next_gauge = now + GAUGE_INTERVAL;
            match store.queue_depth().await {
                Ok(depth) => metrics::gauge!("tracklet_deliveries_queue_depth").set(depth as f64),
                Err(e) => tracing::debug!(error = %e, "cannot read the delivery queue depth"),
            }
        }
        if now >= next_cleanup {
            next_cleanup = now + CLEANUP_INTERVAL;
            delete_old_deliveries(store.as_ref(), &config).await;
        }
        let max = config.max_in_flight.max(1);
        let in_flight = max.saturating_sub(slots.available_permits() as u32);
        let free = if !pressure.high() {
            max.saturating_sub(in_flight)
        } else if now >= next_busy_claim {
            next_busy_claim = now + config.poll_interval;
            config
                .busy_deliveries
                .clamp(1, max)
                .saturating_sub(in_flight)
        } else {
            0
        };
        if free == 0 && outcomes.is_empty() {
            continue;
        }
        for delivery in round(store.as_ref(), &config, owner, &mut outcomes, free).await {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break; // cannot happen: never more claimed than free slots
            };
            let (client, config, done, wake) =
                (client.clone(), config.clone(), done.clone(), wake.clone());
            tasks.spawn(async move {
                let outcome = deliver(&client, &config, delivery).await;
                // The slot is free once the outcome is handed over: the round that records
                // it claims (in the same transaction) for the slot.
                drop(permit);
                let _ = done.send(outcome);
                wake.notify_one();
            });
        }
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(config.timeout + Duration::from_secs(1), drain)
        .await
        .is_err()
    {
        tracing::warn!("webhook attempts still in flight at shutdown; they will be sent again");
    }
    while let Ok(outcome) = finished.try_recv() {
        outcomes.push(outcome);
    }
    if !outcomes.is_empty() {
        round(store.as_ref(), &config, owner, &mut outcomes, 0).await;
    }
}

/// Deletes delivered deliveries older than `--webhook-keep-delivered-days`, in bounded
/// steps.
async fn delete_old_deliveries(store: &dyn DeliveryStore, config: &WebhookConfig) {
    let keep =
        chrono::Duration::from_std(config.keep_delivered).unwrap_or(chrono::Duration::days(7));
    let before = Utc::now() - keep;
    loop {
        match store.delete_delivered_before(before, 10_000).await {
            Ok(10_000) => continue,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot delete old delivered deliveries");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn outcomes_follow_the_schedule() {
        let schedule = [secs(5), secs(300)];
        let now = Utc::now();
        let answer = |status: u16| Attempt {
            status: Some(status),
            retry_after: None,
            error: Some(format!("HTTP {status}")),
        };
        assert_eq!(
            decide(1, &answer(204), &schedule, now, 0.5),
            Finish::Delivered { status: 204 }
        );
        // Middle jitter: exactly the schedule.
        assert!(matches!(decide(1, &answer(500), &schedule, now, 0.5),
            Finish::Retry { at, .. } if at == now + chrono::Duration::seconds(5)));
        assert!(matches!(decide(2, &answer(404), &schedule, now, 0.0),
            Finish::Retry { at, .. } if at == now + chrono::Duration::seconds(240)));
        assert!(matches!(
            decide(3, &answer(500), &schedule, now, 0.5),
            Finish::Failed {
                status: Some(500),
                ..
            }
        ));
        assert!(matches!(
            decide(1, &answer(410), &schedule, now, 0.5),
            Finish::Gone { .. }
        ));
        let limited = Attempt {
            retry_after: Some(secs(42)),
            ..answer(429)
        };
        assert!(matches!(decide(1, &limited, &schedule, now, 0.9),
            Finish::Retry { at, .. } if at == now + chrono::Duration::seconds(42)));
        let no_answer = Attempt {
            status: None,
            retry_after: None,
            error: Some("connection refused".into()),
        };
        assert!(matches!(
            decide(1, &no_answer, &schedule, now, 0.5),
            Finish::Retry { status: None, .. }
        ));
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = std::time::SystemTime::UNIX_EPOCH + secs(1_000_000);
        assert_eq!(parse_retry_after("7", now), Some(secs(7)));
        let later = httpdate::fmt_http_date(now + secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn the_body_carries_the_events_as_stored() {
        let claimed = Claimed {
            id: Uuid::nil(),
            destination_id: Uuid::nil(),
            url: "http://example.com".into(),
            secrets: vec![],
            project: "shop \"one\"".into(),
            events: r#"[{"id":"x","props":{"a":1}}]"#.into(),
            created_at: DateTime::from_timestamp_millis(1_763_800_000_123).unwrap(),
            attempt: 1,
        };
        let bytes = body(&claimed).unwrap();
        // Compact, in this order: what serde wrote for the same structure.
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"type":"events.committed","timestamp":"2025-11-22T08:26:40.123Z","data":{"project":"shop \"one\"","events":[{"id":"x","props":{"a":1}}]}}"#
        );
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "type": "events.committed",
                "timestamp": "2025-11-22T08:26:40.123Z",
                "data": {"project": "shop \"one\"", "events": [{"id": "x", "props": {"a": 1}}]}
            })
        );
    }
}
