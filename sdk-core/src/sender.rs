//! Sending the stored events: when a batch is due, the one batch on the wire, the sending
//! lease that lets one tab at a time send (`tl1:lease`), the backoff after failures shared
//! by every tab (`tl1:retry`), and what the last answers said, for `status()`.
//!
//! The events stay in the [`Store`] while they travel: a batch only marks them in flight,
//! and only the collector's answer removes them, so a page that dies mid-send loses none.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::backoff::RetryState;
use crate::ids::{self, Rng};
use crate::store::Store;
use crate::{gzip, storage, Action, Config, Outcome, Outgoing, Status};
use tracklet_wire::json::{push_u64, BatchJson};

pub(crate) struct Sender {
    /// This tab's id, for the sending lease.
    tab: String,
    /// `(tab id, until ms)`: the tab that may send, as storage last said.
    lease: Option<(String, u64)>,
    in_flight: Option<InFlight>,
    next_batch: u64,
    /// After a 413, batches are at most this many events until one is accepted.
    split_limit: Option<usize>,
    retry: RetryState,
    online: bool,
    /// After a 401 or 403: nothing is sent again by this page.
    blocked: bool,
    /// Events the collector refused for good (`status().rejected`).
    rejected: u64,
    last_error: Option<String>,
    last_sent_at: Option<u64>,
}

struct InFlight {
    batch: u64,
    batch_id: String,
    /// How many events it holds: the queued events marked `in_flight`.
    events: usize,
    /// The `dropped` count this batch reported.
    dropped: u64,
}

/// Up to `limit` of the oldest events not in flight, as a gzip body under the request cap
/// (halving the count until it fits).
fn build_body(store: &Store, now: u64, limit: usize, batch_id: &str) -> (usize, Vec<u8>) {
    let mut n = limit;
    loop {
        let mut batch = BatchJson::with_batch_id(now, store.dropped(), batch_id);
        let mut events = 0;
        for (_, json) in store.sendable() {
            if events == n {
                break;
            }
            batch.push_raw_event(json);
            events += 1;
        }
        let body = gzip::gzip(batch.finish().as_bytes());
        if body.len() <= tracklet_wire::SDK_MAX_REQUEST_BYTES || events <= 1 {
            return (events, body);
        }
        n = events / 2;
    }
}

impl Sender {
    /// `tab`: this tab's id, drawn at random (the lease names its holder by it).
    pub fn new(tab: String) -> Self {
        Sender {
            tab,
            lease: None,
            in_flight: None,
            next_batch: 1,
            split_limit: None,
            retry: RetryState::default(),
            online: true,
            blocked: false,
            rejected: 0,
            last_error: None,
            last_sent_at: None,
        }
    }

    /// Reads the shared retry state and lease.
    pub fn adopt<'a>(&mut self, entries: impl Iterator<Item = (&'a str, &'a str)>) {
        let mut retry = RetryState::default();
        let mut lease = None;
        for (key, value) in entries {
            match key {
                storage::RETRY => retry = RetryState::decode(value).unwrap_or_default(),
                storage::LEASE => lease = Some(value),
                _ => {}
            }
        }
        self.retry = retry;
        self.adopt_lease(lease);
    }

    pub fn set_online(&mut self, online: bool) {
        self.online = online;
    }

    /// Another tab wrote the lease key (`None`: removed it).
    pub fn adopt_lease(&mut self, value: Option<&str>) {
        self.lease = value
            .and_then(storage::split_pair)
            .map(|(tab, until)| (tab.to_string(), until));
    }

    /// Until when another tab holds the sending lease, if it does.
    pub fn lease_held_elsewhere(&self, now: u64) -> Option<u64> {
        match &self.lease {
            Some((owner, until)) if *owner != self.tab && *until > now => Some(*until),
            _ => None,
        }
    }

    /// Whether a batch is due now (for `force`, whenever anything is queued), given the
    /// batching rules, backoff, `Retry-After`, connectivity and the other tabs' lease.
    fn may_send(&self, store: &Store, cfg: &Config, now: u64, force: bool) -> bool {
        if self.in_flight.is_some() || !self.online || self.blocked || store.is_empty() {
            return false;
        }
        if now < self.retry.not_before || self.lease_held_elsewhere(now).is_some() {
            return false;
        }
        if force {
            return true;
        }
        if now < self.retry.next_at {
            return false;
        }
        self.retry.failures > 0
            || store.len() >= cfg.max_batch_size
            || store
                .oldest_ms()
                .is_some_and(|t| t.saturating_add(cfg.max_wait_ms) <= now)
    }

    /// Whether [`Sender::poll_send`] would answer a batch now (not forced).
    pub fn poll_due(&self, store: &Store, cfg: &Config, now: u64) -> bool {
        self.may_send(store, cfg, now, false) && store.oldest_ms().is_some()
    }

    /// The next batch to send, if one is due: its events are marked in flight and this
    /// tab takes the lease. While it is in flight no other batch is started.
    pub fn poll_send(
        &mut self,
        store: &mut Store,
        rng: &mut Rng,
        cfg: &Config,
        now: u64,
        force: bool,
    ) -> Option<Outgoing> {
        if !self.may_send(store, cfg, now, force) || store.oldest_ms().is_none() {
            return None;
        }
        // A backlog (a burst, or what queued up during an outage) goes in bigger requests,
        // bounded by the collector's cap and the request size: it drains in a few round
        // trips instead of reaching the queue's bounds.
        let backlog = store.len() > cfg.max_batch_size;
        let normal = if backlog {
            tracklet_wire::MAX_EVENTS_PER_BATCH
        } else {
            cfg.max_batch_size
        };
        let limit = self
            .split_limit
            .unwrap_or(normal)
            .clamp(1, tracklet_wire::MAX_EVENTS_PER_BATCH);
        let batch_id = ids::uuid_v4(rng);
        let (events, body) = build_body(store, now, limit, &batch_id);
        // The batch holds the first `events` events not in flight nor held.
        store.mark_in_flight(events);
        let batch = self.next_batch;
        self.next_batch += 1;
        self.in_flight = Some(InFlight {
            batch,
            batch_id: batch_id.clone(),
            events,
            dropped: store.dropped(),
        });
        self.lease = Some((self.tab.clone(), now + cfg.lease_ms));
        store.actions.push(Action::Set(
            storage::LEASE.into(),
            storage::join_pair(&self.tab, now + cfg.lease_ms),
        ));
        Some(Outgoing {
            batch,
            batch_id,
            body,
            events,
        })
    }

    /// Reports what became of batch `batch`.
    pub fn on_result(
        &mut self,
        store: &mut Store,
        rng: &mut Rng,
        cfg: &Config,
        batch: u64,
        outcome: Outcome,
        now: u64,
    ) {
        let Some(flight) = self.in_flight.take_if(|f| f.batch == batch) else {
            return;
        };
        // Its answer came after all (a page back from the back-forward cache).
        store.forget_unconfirmed(&flight.batch_id);
        // A network error is a lost answer, not a refusal: the request may have reached
        // the collector (the browser cuts a page's requests off as it navigates away,
        // and a keepalive request still arrives). Its events are held as an unconfirmed
        // batch, so this page or the next asks the collector before sending them again.
        let answer_lost = matches!(outcome, Outcome::Retry { status: 0, .. });
        let lost = answer_lost.then(|| (flight.batch_id.clone(), store.in_flight_ids()));
        self.settle(store, rng, cfg, flight, outcome, now);
        store.end_flight();
        if let Some((batch_id, ids)) = lost {
            store.remember_unconfirmed(batch_id, now, ids);
        }
        // Last, after the removals: a tab that sees the lease gone also sees them (one
        // tab's storage writes reach the others in order), so it never resends them.
        self.release_lease(&mut store.actions);
    }

    fn settle(
        &mut self,
        store: &mut Store,
        rng: &mut Rng,
        cfg: &Config,
        flight: InFlight,
        outcome: Outcome,
        now: u64,
    ) {
        let n = flight.events;
        // `status().lastError`: text, a number, text (the number left out when 0).
        let error: (&str, u64, &str) = match outcome {
            Outcome::Accepted { rejected } => {
                let rejected = rejected.iter().filter(|&&i| i < n).count() as u64;
                self.rejected += rejected;
                store.remove_in_flight();
                self.last_sent_at = Some(now);
                self.split_limit = None;
                self.reset_retry(&mut store.actions);
                store.dropped_reported(flight.dropped);
                ("", rejected, " events rejected by the collector")
            }
            Outcome::BadRequest => {
                self.rejected += n as u64;
                store.remove_in_flight();
                self.reset_retry(&mut store.actions);
                ("HTTP ", 400, ": batch rejected by the collector")
            }
            Outcome::TooLarge if n > 1 => {
                self.split_limit = Some(n / 2);
                ("HTTP ", 413, ": batch too large, splitting it")
            }
            Outcome::TooLarge => {
                self.rejected += 1;
                store.remove_in_flight();
                ("HTTP ", 413, ": event too large")
            }
            Outcome::Unauthorized { status } => {
                self.blocked = true;
                (
                    "HTTP ",
                    status as u64,
                    ": check the apiKey and the project's allowed origins",
                )
            }
            Outcome::Retry {
                status,
                retry_after_ms,
            } => {
                self.retry.failures += 1;
                let delay = cfg.backoff.delay_ms(self.retry.failures, rng);
                self.retry.not_before = retry_after_ms.map_or(0, |ra| now + ra);
                self.retry.next_at = (now + delay).max(self.retry.not_before);
                store
                    .actions
                    .push(Action::Set(storage::RETRY.into(), self.retry.encode()));
                match status {
                    0 => ("network error", 0, ""),
                    _ => ("HTTP ", status as u64, ""),
                }
            }
            Outcome::Offline => {
                self.online = false;
                ("offline", 0, "")
            }
        };
        self.last_error = match error {
            ("", 0, _) => None,
            (lead, n, tail) => {
                let mut s = String::from(lead);
                if n > 0 {
                    push_u64(&mut s, n);
                }
                s.push_str(tail);
                Some(s)
            }
        };
    }

    /// Gives up the sending role if this tab holds it.
    fn release_lease(&mut self, actions: &mut Vec<Action>) {
        if self
            .lease
            .as_ref()
            .is_some_and(|(owner, _)| *owner == self.tab)
        {
            self.lease = None;
            actions.push(Action::Remove(storage::LEASE.into()));
        }
    }

    fn reset_retry(&mut self, actions: &mut Vec<Action>) {
        if self.retry != RetryState::default() {
            self.retry = RetryState::default();
            actions.push(Action::Remove(storage::RETRY.into()));
        }
    }

    /// The page is going away: gives up this tab's lease (the next page must not wait for
    /// a lease whose holder is gone) and remembers the batch in flight, whose answer may
    /// never come, as unconfirmed.
    pub fn hand_over(&mut self, store: &mut Store, now: u64) {
        self.release_lease(&mut store.actions);
        if let Some(flight) = &self.in_flight {
            let ids = store.in_flight_ids();
            store.remember_unconfirmed(flight.batch_id.clone(), now, ids);
        }
    }

    /// The `sendBeacon` body for the unload: the oldest events not in flight, as many as
    /// one request under the cap holds, remembered as an unconfirmed batch.
    pub fn beacon_body(&mut self, store: &mut Store, rng: &mut Rng, now: u64) -> Option<Vec<u8>> {
        if !self.online || self.blocked || now < self.retry.not_before {
            return None;
        }
        let batch_id = ids::uuid_v4(rng);
        let (events, body) = build_body(store, now, tracklet_wire::MAX_EVENTS_PER_BATCH, &batch_id);
        if events == 0 {
            return None;
        }
        let mut ids = Vec::with_capacity(events);
        for (id, _) in store.sendable() {
            if ids.len() == events {
                break;
            }
            ids.push(id.clone());
        }
        store.remember_unconfirmed(batch_id, now, ids);
        Some(body)
    }

    /// When [`Sender::poll_send`] should be called next, if ever.
    pub fn next_wake(&self, store: &Store, cfg: &Config) -> Option<u64> {
        if self.in_flight.is_some() || !self.online || self.blocked {
            return None;
        }
        let oldest = store.oldest_ms()?;
        let due = if self.retry.failures > 0 {
            self.retry.next_at
        } else if store.len() >= cfg.max_batch_size {
            0
        } else {
            oldest.saturating_add(cfg.max_wait_ms)
        };
        let mut t = due.max(self.retry.not_before);
        if let Some((owner, until)) = &self.lease {
            if *owner != self.tab {
                t = t.max(*until);
            }
        }
        Some(t)
    }

    /// `status()`, with the store's counts and the opt-out.
    pub fn status(&self, store: &Store, opted_out: bool) -> Status {
        Status {
            pending: store.len(),
            in_flight: self.in_flight.as_ref().map_or(0, |f| f.events),
            last_error: self.last_error.clone(),
            last_sent_at: self.last_sent_at,
            next_retry_at: (self.retry.failures > 0 || self.retry.not_before > 0)
                .then(|| self.retry.next_at.max(self.retry.not_before)),
            online: self.online,
            rejected: self.rejected,
            dropped: store.dropped(),
            opted_out,
        }
    }
}
