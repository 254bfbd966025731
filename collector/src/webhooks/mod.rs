//! Webhooks: a project's committed events pushed to HTTP destinations, signed per Standard
//! Webhooks, from a delivery queue kept in the database.
//!
//! The queue is a transactional outbox: [`outbox`] writes a delivery per (destination, group
//! of newly stored events) in the transaction that stores the events, so nothing committed
//! is missed and nothing uncommitted is sent. [`worker`] claims due deliveries with a lease
//! (several collectors share the work, an expired lease is claimed again), signs them
//! ([`signing`]), sends them and records the outcome with retries on a schedule.
//! [`destinations`] owns what a destination URL may be. The SQL of each backend lives in
//! [`postgres`] and [`sqlite`], behind [`DeliveryStore`].

pub mod destinations;
pub mod outbox;
pub mod postgres;
pub mod signing;
pub mod sqlite;
pub mod worker;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::store::StoreError;

/// Events per delivery unless `--batch-size` says otherwise.
pub const DEFAULT_BATCH_SIZE: u32 = 100;
/// Largest `--batch-size`.
pub const MAX_BATCH_SIZE: u32 = 1000;
/// How long the previous secret keeps signing after `rotate-secret` (as Svix does).
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// A destination as listed (the secrets are never listed: shown once, at `add` and
/// `rotate-secret`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Destination {
    pub id: Uuid,
    pub project_id: Uuid,
    /// The project's name.
    pub project: String,
    pub url: String,
    /// Event names delivered; empty: every event.
    pub events: Vec<String>,
    pub batch_size: u32,
    pub enabled: bool,
    /// Why it was disabled (`disable`, or a 410 from the destination).
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A destination to create.
#[derive(Debug, Clone)]
pub struct NewDestination {
    pub id: Uuid,
    pub project_id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub batch_size: u32,
    pub secret: String,
}

/// A delivery claimed by a worker, with what it takes to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub destination_id: Uuid,
    pub url: String,
    /// The current secret, then the previous one while a rotation overlaps.
    pub secrets: Vec<String>,
    pub project: String,
    /// The JSON array of events (as stored) this delivery carries.
    pub events: String,
    pub created_at: DateTime<Utc>,
    /// This attempt's number, from 1.
    pub attempt: u32,
}

/// What became of an attempt, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// A 2xx answer.
    Delivered { status: u16 },
    /// Tried again at `at`.
    Retry {
        at: DateTime<Utc>,
        status: Option<u16>,
        error: String,
    },
    /// No attempt left: kept as failed, for `replay`.
    Failed { status: Option<u16>, error: String },
    /// 410 Gone: the delivery fails and the destination is disabled.
    Gone { error: String },
}

/// An attempt's outcome, to record while the attempt's lease holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub delivery: Uuid,
    pub destination_id: Uuid,
    /// The attempt's number ([`Claimed::attempt`]): a later claim's outcome is not this one.
    pub attempt: u32,
    /// When the attempt ended.
    pub at: DateTime<Utc>,
    pub finish: Finish,
}

impl Outcome {
    pub fn of(claimed: &Claimed, at: DateTime<Utc>, finish: Finish) -> Outcome {
        Outcome {
            delivery: claimed.id,
            destination_id: claimed.destination_id,
            attempt: claimed.attempt,
            at,
            finish,
        }
    }
}

/// Per destination: the queue and its last trouble (`destinations status`,
/// `GET /v1/destinations/status`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DestinationStatus {
    pub id: Uuid,
    pub project: String,
    pub url: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// Waiting for an attempt (due now or later), not claimed.
    pub pending: i64,
    /// Claimed by a worker whose lease runs.
    pub in_flight: i64,
    pub delivered: i64,
    pub failed: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The earliest next attempt of a pending delivery.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The delivery queue's storage (both backends; see [`postgres`] and [`sqlite`]).
#[async_trait]
pub trait DeliveryStore: Send + Sync + 'static {
    async fn add_destination(&self, destination: &NewDestination) -> Result<(), StoreError>;
    async fn list_destinations(&self) -> Result<Vec<Destination>, StoreError>;
    /// Removes a destination and its deliveries; false when there is none with `id`.
    async fn remove_destination(&self, id: Uuid) -> Result<bool, StoreError>;
    /// Enables or disables (with a reason) a destination; false when there is none.
    async fn set_enabled(
        &self,
        id: Uuid,
        enabled: bool,
        reason: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Replaces the secret; the old one keeps signing until `previous_until`.
    async fn rotate_secret(
        &self,
        id: Uuid,
        secret: &str,
        previous_until: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Claims up to `max` due deliveries of enabled destinations for `owner` until
    /// `now + lease`, keeping each destination at most `per_destination` leased deliveries
    /// (counting every collector's). Counts the attempt.
    async fn claim(
        &self,
        owner: Uuid,
        now: DateTime<Utc>,
        max: u32,
        per_destination: u32,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// Records an attempt's outcome, if `owner` still holds the lease of that attempt
    /// (false: the lease expired and the delivery was claimed again).
    async fn finish(&self, outcome: &Outcome, owner: Uuid) -> Result<bool, StoreError>;
    /// Records `outcomes` as [`DeliveryStore::finish`] does (whether each was, in order),
    /// then claims as [`DeliveryStore::claim`] does: the workers' one call per round. A
    /// backend may do both in one transaction (Postgres does); on an error nothing is
    /// recorded or claimed that the caller cannot record again.
    async fn finish_and_claim(
        &self,
        outcomes: &[Outcome],
        owner: Uuid,
        now: DateTime<Utc>,
        max: u32,
        per_destination: u32,
        lease: Duration,
    ) -> Result<(Vec<bool>, Vec<Claimed>), StoreError> {
        let mut recorded = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            recorded.push(self.finish(outcome, owner).await?);
        }
        let claimed = self.claim(owner, now, max, per_destination, lease).await?;
        Ok((recorded, claimed))
    }
    /// Queues the destination's failed deliveries created in `[from, to)` again (same ids,
    /// so the same `webhook-id`); returns how many.
    async fn replay(
        &self,
        destination: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    /// Status of every destination, or of one project's.
    async fn status(
        &self,
        project: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DestinationStatus>, StoreError>;
    /// Deliveries waiting or in flight, all destinations (the queue depth gauge).
    async fn queue_depth(&self) -> Result<i64, StoreError>;
    /// Deletes delivered deliveries finished before `before` (at most `limit`).
    async fn delete_delivered_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
}

/// The delivery workers' settings (`serve --webhook-*`).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Requests in flight per destination, all collectors together.
    pub concurrency: u32,
    /// Requests in flight in this collector, all destinations together.
    pub max_in_flight: u32,
    /// While ingest is saturated ([`crate::commit::IngestPressure`]): attempts started per
    /// `poll_interval`, and at most in flight.
    pub busy_deliveries: u32,
    /// Waits before the 2nd, 3rd, ... attempt; after the last, a delivery fails.
    pub retry_schedule: Vec<Duration>,
    /// Per attempt, connect to last byte.
    pub timeout: Duration,
    /// How long a claim holds a delivery; a worker that died lets it go after this.
    pub lease: Duration,
    /// How often due deliveries are looked for.
    pub poll_interval: Duration,
    /// Whether destinations may resolve to loopback, private or link-local addresses.
    pub allow_private: bool,
    /// How long delivered deliveries are kept (their counts in `status` cover this long).
    pub keep_delivered: Duration,
    /// No workers in this collector (others sharing the database deliver).
    pub disabled: bool,
}

/// Standard Webhooks' schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
pub const DEFAULT_RETRY_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,10h";

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            concurrency: 3,
            max_in_flight: 64,
            busy_deliveries: 1,
            retry_schedule: parse_schedule(DEFAULT_RETRY_SCHEDULE).unwrap_or_default(),
            timeout: Duration::from_secs(15),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            allow_private: false,
            keep_delivered: crate::config::days(7),
            disabled: false,
        }
    }
}

/// `5s,5m,30m` -> durations (humantime syntax, comma-separated).
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

/// The `webhook-id` of a delivery: the same on every attempt.
pub fn message_id(delivery: Uuid) -> String {
    format!("msg_{}", delivery.simple())
}
