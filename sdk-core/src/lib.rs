//! Tracklet SDK core: every decision of the SDK, with no I/O.
//!
//! Nothing in here reads a clock, draws a random number or touches a browser. Time comes
//! in as `now` (ms since the Unix epoch), randomness as a seed, stored state as key/value
//! pairs, answers from the collector as status codes and header text. Two layers:
//!
//! - [`Tracker`] (`tracker.rs`) is what the browser driver (`sdk-wasm`) talks to: page
//!   events, answers, timers and the cross-tab lock go in; [`Output`]s come out (persist,
//!   transmit, take or release the lock, wake at T, status changed), in the style of str0m.
//!   It owns the rules around the queue: forceSend's drain, the retry-soon rule, reading
//!   `Retry-After`, what counts as offline, the storage keys' meaning, the pre-load queue,
//!   and asking the collector which unload batches arrived.
//! - [`Core`] (this file) is the queue engine under it, in three parts, each with its own
//!   state; `Core` makes events and routes each call to the parts it concerns:
//!   - `store.rs` (`Store`): the queued events as storage holds them (records, gone-lists,
//!     the dropped count, unconfirmed batches), restore and refresh, the queue's bounds,
//!     and the storage [`Action`]s pending for the binding, which every part adds to;
//!   - `sender.rs` (`Sender`): when a batch is due, the batch in flight and its answer,
//!     the sending lease, retry state and the unload beacon;
//!   - `identity.rs` (`Identity`): anonymous id, user id, session and opt-out.
//!
//! Tests drive both layers directly, faster than real time.

extern crate alloc;

pub mod backoff;
pub mod gzip;
mod identity;
pub mod ids;
pub mod memory;
pub mod options;
mod queue;
mod sender;
pub mod storage;
mod store;
pub mod tracker;

pub use options::{Autocapture, Options, Settings};
pub use tracker::{HttpDateParser, Output, Tracker, Transmit, TransmitKind};

use alloc::string::String;
use alloc::vec::Vec;

pub use backoff::{BackoffSchedule, RetryState};
use identity::Identity;
use ids::{Rng, UuidV7};
use sender::Sender;
use store::Store;
use tracklet_wire::json::EventJson;

/// Settings of one tracker, from `tracklet.init(options)`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Send when this many events are queued. A larger backlog goes in bigger requests (up
    /// to [`tracklet_wire::MAX_EVENTS_PER_BATCH`] events and the request size cap).
    pub max_batch_size: usize,
    /// ... or when the oldest queued event is this old (ms).
    pub max_wait_ms: u64,
    /// Most events kept; beyond it the oldest are dropped (and reported).
    pub max_queue_events: usize,
    /// Most bytes of event JSON kept (localStorage quotas are about 5 MB per origin).
    pub max_queue_bytes: usize,
    pub backoff: BackoffSchedule,
    /// How long a tab may hold the sending role without renewing it (a closed or crashed
    /// tab's role passes to another tab after this).
    pub lease_ms: u64,
    /// A session ends after this much inactivity (ms).
    pub session_idle_ms: u64,
    /// `(event name, keep rate 0..=1)`.
    pub sampling: Vec<(String, f64)>,
    /// Event names never sampled out nor dropped for space.
    pub always_keep: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_batch_size: 50,
            max_wait_ms: 5_000,
            max_queue_events: 1_000,
            max_queue_bytes: 2_000_000,
            backoff: BackoffSchedule::default(),
            lease_ms: 30_000,
            session_idle_ms: 30 * 60 * 1000,
            sampling: Vec::new(),
            always_keep: Vec::new(),
        }
    }
}

/// A storage change for the binding to carry out, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Set(String, String),
    Remove(String),
}

/// A batch to POST: gzip-compressed JSON, at most [`tracklet_wire::SDK_MAX_REQUEST_BYTES`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Pass back to [`Core::on_result`].
    pub batch: u64,
    /// The batch's `batch_id` on the wire (a UUIDv4): what the next page asks the
    /// collector about if this page goes away before the answer comes.
    pub batch_id: String,
    pub body: Vec<u8>,
    pub events: usize,
}

/// What became of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx. The indices are the events the collector listed as `rejected`.
    Accepted { rejected: Vec<usize> },
    /// 400 for the whole batch: it can never be accepted.
    BadRequest,
    /// 413: split the batch.
    TooLarge,
    /// 401/403: stop sending, keep the events.
    Unauthorized { status: u16 },
    /// Network error, 408, 429, 5xx: back off; `retry_after_ms` from the header.
    Retry {
        status: u16,
        retry_after_ms: Option<u64>,
    },
    /// The request failed while the browser reports being offline: no attempt is spent.
    Offline,
}

/// Why `track()` did not queue an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    OptedOut,
    Sampled,
    TooLarge,
    InvalidName,
}

impl Skipped {
    /// Why, in words (for the debug log).
    pub fn reason(self) -> &'static str {
        match self {
            Skipped::OptedOut => "tracking is off",
            Skipped::Sampled => "sampled out",
            Skipped::TooLarge => "larger than 32 KB",
            Skipped::InvalidName => "the name must be 1 to 200 characters",
        }
    }
}

/// What `status()` reports, to the page as an object with these names in camelCase
/// (`inFlight`, `lastError`, ...; `None` is `null`). Counts are events; times are ms since
/// the epoch. The one definition of the status shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Events not yet acknowledged (including those in flight).
    pub pending: usize,
    pub in_flight: usize,
    pub last_error: Option<String>,
    pub last_sent_at: Option<u64>,
    pub next_retry_at: Option<u64>,
    pub online: bool,
    /// Events the collector refused for good (`rejected` lists, 400s, unsplittable 413s).
    pub rejected: u64,
    /// Events dropped for space since the last acknowledged batch.
    pub dropped: u64,
    pub opted_out: bool,
}

/// The queue engine: a `Store`, a `Sender` and an `Identity` (see the module doc), and
/// what needs more than one of them: making an event, restore, `status()`, and no sending
/// while the user is opted out.
pub struct Core {
    cfg: Config,
    /// The one source of randomness (ids, sampling, jitter), so a seed fixes every draw.
    rng: Rng,
    uuid: UuidV7,
    /// Page-level context added to every event.
    context: Option<String>,
    store: Store,
    sender: Sender,
    identity: Identity,
}

impl Core {
    /// A core with an empty queue. `seed` must differ between tabs (the binding draws it
    /// from `crypto.getRandomValues`). Call [`Core::restore`] next with what storage holds.
    pub fn new(cfg: Config, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let tab = ids::uuid_v4(&mut rng);
        Core {
            cfg,
            rng,
            uuid: UuidV7::default(),
            context: None,
            store: Store::default(),
            sender: Sender::new(tab),
            identity: Identity::default(),
        }
    }

    /// Loads what storage holds (every `tl1:` key with its value): the queue left by
    /// earlier pages and other tabs, identity, and the shared retry state. Corrupt
    /// records are removed one by one. Creates the anonymous id when there is none.
    pub fn restore<'a, I>(&mut self, entries: I)
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: Clone,
    {
        self.adopt(entries.into_iter(), true);
        self.identity
            .ensure_anonymous_id(&mut self.rng, &mut self.store.actions);
        self.store.enforce_caps(&self.cfg);
    }

    /// Re-reads shared state written by other tabs (call before sending and before
    /// clearing): their queued events, acknowledgements, retry state, lease and identity.
    pub fn refresh<'a, I>(&mut self, entries: I)
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: Clone,
    {
        self.adopt(entries.into_iter(), false);
    }

    /// Each part reads its own keys. (`entries` is read more than once, hence `Clone`: no
    /// copy of the snapshot is made.)
    fn adopt<'a>(
        &mut self,
        entries: impl Iterator<Item = (&'a str, &'a str)> + Clone,
        first: bool,
    ) {
        self.store.adopt(entries.clone(), first, &self.cfg);
        self.identity.adopt(entries.clone());
        self.sender.adopt(entries);
    }

    /// Page-level context (url, path, title, screen, ...) as a JSON object, added to every
    /// event tracked after this call.
    pub fn set_context(&mut self, context_json: Option<String>) {
        self.context = context_json;
    }

    /// Queues one event. `props_json` must be a JSON object (the binding passes the output
    /// of `JSON.stringify`). Returns the event id.
    pub fn track(
        &mut self,
        name: &str,
        props_json: Option<&str>,
        now: u64,
    ) -> Result<String, Skipped> {
        if self.identity.opted_out() {
            return Err(Skipped::OptedOut);
        }
        // Characters are the bytes that do not continue a UTF-8 sequence.
        let chars = name.bytes().filter(|b| b & 0xc0 != 0x80).count();
        if chars == 0 || chars > tracklet_wire::MAX_NAME_LEN {
            return Err(Skipped::InvalidName);
        }
        let keep = self.cfg.always_keep.iter().any(|k| k == name);
        if !keep {
            if let Some((_, rate)) = self.cfg.sampling.iter().find(|(n, _)| n == name) {
                if !self.rng.chance(*rate) {
                    return Err(Skipped::Sampled);
                }
            }
        }
        self.identity
            .touch_session(now, &self.cfg, &mut self.rng, &mut self.store.actions);
        let id = self.uuid.next(now, &mut self.rng);
        let mut json = String::with_capacity(
            200 + props_json.map_or(0, str::len) + self.context.as_ref().map_or(0, String::len),
        );
        EventJson {
            id: &id,
            name,
            ts: now,
            anonymous_id: self.identity.anonymous_id(),
            session_id: self.identity.session_id(),
            user_id: self.identity.user_id(),
            props: props_json,
            context: self.context.as_deref(),
        }
        .write(&mut json);
        if json.len() > tracklet_wire::MAX_EVENT_BYTES {
            return Err(Skipped::TooLarge);
        }
        // Persisted by the next `take_actions()`, which the binding calls before the task
        // ends: one storage write for all the events of a task.
        self.store.push_tracked(id.clone(), json, keep);
        Ok(id)
    }

    /// Sets the user id for this and later events (persisted, shared by tabs).
    pub fn identify(&mut self, user_id: &str) {
        self.identity.identify(user_id, &mut self.store.actions);
    }

    /// New anonymous id and session, no user id (for logout).
    pub fn reset(&mut self, now: u64) {
        self.identity
            .reset(now, &self.cfg, &mut self.rng, &mut self.store.actions);
    }

    /// Stops tracking (persisted) and discards what is queued.
    pub fn opt_out(&mut self) -> usize {
        self.identity.opt_out(&mut self.store.actions);
        self.store.clear()
    }

    pub fn opt_in(&mut self) {
        self.identity.opt_in(&mut self.store.actions);
    }

    pub fn opted_out(&self) -> bool {
        self.identity.opted_out()
    }

    /// Another tab wrote the session key (the binding listens for `storage` events).
    pub fn adopt_session(&mut self, value: &str) {
        self.identity.adopt_session(value);
    }

    pub fn anonymous_id(&self) -> &str {
        self.identity.anonymous_id()
    }

    pub fn session_id(&self) -> &str {
        self.identity.session_id()
    }

    /// The binding could not write this key (quota exceeded, storage disabled): its events
    /// live on in memory only, and a refresh must not mistake them for acknowledged.
    pub fn persist_failed(&mut self, key: &str) {
        self.store.persist_failed(key);
    }

    /// Discards every queued event that is not in flight; returns how many.
    pub fn clear(&mut self) -> usize {
        self.store.clear()
    }

    pub fn set_online(&mut self, online: bool) {
        self.sender.set_online(online);
    }

    /// Storage changes to carry out now, in order. The queue's bounds are enforced here,
    /// once per task rather than once per `track()`: a burst of thousands of events in one
    /// task then costs one pass over the queue, not one per event (the queue may exceed its
    /// bounds until the task's end).
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.store.take_actions(&self.cfg)
    }

    /// Events not yet acknowledged, in flight included.
    pub fn pending(&self) -> usize {
        self.store.len()
    }

    pub fn status(&self) -> Status {
        self.sender.status(&self.store, self.identity.opted_out())
    }

    /// Another tab wrote the lease key (`None`: removed it).
    pub fn adopt_lease(&mut self, value: Option<&str>) {
        self.sender.adopt_lease(value);
    }

    /// Until when another tab holds the sending lease, if it does.
    pub fn lease_held_elsewhere(&self, now: u64) -> Option<u64> {
        self.sender.lease_held_elsewhere(now)
    }

    /// Whether [`Core::poll_send`] would answer a batch now (not forced).
    pub fn poll_due(&self, now: u64) -> bool {
        !self.identity.opted_out() && self.sender.poll_due(&self.store, &self.cfg, now)
    }

    /// The next batch to send, if one is due (for `force`, whenever anything is queued),
    /// given the batching rules, backoff, `Retry-After`, connectivity and the other tabs'
    /// lease. While it is in flight no other batch is started; report its fate with
    /// [`Core::on_result`].
    pub fn poll_send(&mut self, now: u64, force: bool) -> Option<Outgoing> {
        if self.identity.opted_out() {
            return None;
        }
        self.sender
            .poll_send(&mut self.store, &mut self.rng, &self.cfg, now, force)
    }

    /// Reports what became of batch `batch`.
    pub fn on_result(&mut self, batch: u64, outcome: Outcome, now: u64) {
        self.sender.on_result(
            &mut self.store,
            &mut self.rng,
            &self.cfg,
            batch,
            outcome,
            now,
        );
    }

    /// The body for `sendBeacon` when the page goes away: what is queued and not in
    /// flight, oldest first, as much as one request under the browser's 64 KB budget for
    /// requests that outlive the page holds. Events stay stored until a normal send is
    /// acknowledged; the collector drops the duplicates.
    ///
    /// Also gives up this tab's sending lease: the next page must not wait for a lease
    /// whose holder is gone. A batch still in flight (a keepalive fetch) may then be sent
    /// again by the next page; the collector drops the duplicates.
    ///
    /// Both the beacon and a batch still in flight are remembered as unconfirmed
    /// (`tl1:b:<batch id>`): the next page asks the collector which arrived before sending
    /// their events again (see [`Core::unconfirmed_due`]).
    pub fn unload_body(&mut self, now: u64) -> Option<Vec<u8>> {
        self.sender.hand_over(&mut self.store, now);
        if self.identity.opted_out() {
            return None;
        }
        self.sender.beacon_body(&mut self.store, &mut self.rng, now)
    }

    /// The unconfirmed batches to ask the collector about now, if any: those sent at
    /// least `delay_ms` ago (a beacon may still be on its way to the database).
    pub fn unconfirmed_due(&self, now: u64, delay_ms: u64) -> Option<Vec<String>> {
        self.store.unconfirmed_due(now, delay_ms)
    }

    /// When the oldest unconfirmed batch becomes due for the question, if any.
    pub fn unconfirmed_at(&self, delay_ms: u64) -> Option<u64> {
        self.store.unconfirmed_at(delay_ms)
    }

    /// The collector's answer about the unconfirmed batches `asked`: `arrived` lists those
    /// it committed (their events are acknowledged and leave the queue), `None` when it
    /// could not say (no answer, an error): then, as for those not listed, their events
    /// are released and sent again (the collector drops duplicates by event id).
    /// Returns how many events were acknowledged.
    pub fn confirm(&mut self, asked: &[String], arrived: Option<&[String]>) -> usize {
        self.store.confirm(asked, arrived)
    }

    /// When the binding should call [`Core::poll_send`] next, if ever (an `online` event,
    /// a new `track()` or an answer may bring it forward).
    pub fn next_wake(&self) -> Option<u64> {
        if self.identity.opted_out() {
            return None;
        }
        self.sender.next_wake(&self.store, &self.cfg)
    }
}

#[cfg(test)]
mod tests;
