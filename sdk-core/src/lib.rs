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
//! - [`Core`] (this file) is the queue engine under it: the stored layout and restore,
//!   batching, the sending lease, retry state and identity.
//!
//! Tests drive both directly, faster than real time.

extern crate alloc;

pub mod backoff;
pub mod gzip;
pub mod ids;
pub mod memory;
pub mod options;
mod queue;
pub mod storage;
pub mod text;
pub mod tracker;

pub use options::{Autocapture, Options, Settings};
pub use tracker::{HttpDateParser, Output, Tracker, Transmit, TransmitKind};

use alloc::string::{String, ToString};
use alloc::vec::Vec;

pub use backoff::{BackoffSchedule, RetryState};
use ids::{Rng, UuidV7};
use queue::{EventQueue, Record};
use tracklet_wire::json::{push_str_literal, push_u64, BatchJson, EventJson};

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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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

#[derive(Clone, Debug)]
struct InFlight {
    batch: u64,
    batch_id: String,
    /// How many events it holds: the queued events marked `in_flight`.
    events: usize,
    /// The `dropped` count this batch reported.
    dropped: u64,
}

#[derive(Clone, Debug, Default)]
struct Session {
    id: String,
    last: u64,
    persisted_last: u64,
}

pub struct Core {
    cfg: Config,
    rng: Rng,
    uuid: UuidV7,
    /// This tab's id, for the sending lease.
    tab: String,
    /// Unacknowledged events by id; UUIDv7 ids sort by creation time.
    queue: EventQueue,
    anon: String,
    user: Option<String>,
    session: Session,
    context: Option<String>,
    retry: RetryState,
    dropped: u64,
    lease: Option<(String, u64)>,
    in_flight: Option<InFlight>,
    next_batch: u64,
    /// After a 413, batches are at most this many events until one is accepted.
    split_limit: Option<usize>,
    online: bool,
    blocked: bool,
    opted_out: bool,
    rejected: u64,
    last_error: Option<String>,
    last_sent_at: Option<u64>,
    actions: Vec<Action>,
    /// The storage record (its serial number in the queue's table) this task's events go into,
    /// written by the next [`Core::take_actions`] (which the binding calls before the task ends).
    open_chunk: Option<u32>,
    /// Batches sent without an answer seen (the unload beacon, a request cut off by the
    /// page going away), by this page or an earlier one: their events are held back until
    /// the collector says which arrived ([`Core::confirm`]).
    unconfirmed: Vec<Unconfirmed>,
}

/// A batch whose fate is unknown (`tl1:b:<batch id>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unconfirmed {
    pub batch_id: String,
    /// When it was sent (ms).
    pub sent_at: u64,
    pub events: Vec<String>,
}

const SESSION_PERSIST_EVERY_MS: u64 = 5_000;

fn pair(a: &str, n: u64) -> String {
    let mut s = String::with_capacity(a.len() + 14);
    s.push_str(a);
    s.push(' ');
    push_u64(&mut s, n);
    s
}

/// `tl1:a:<first id>`: the gone-list of record `tl1:e:<first id>`.
fn gone_key(chunk: &str) -> String {
    let mut k = String::from(storage::GONE);
    k.push_str(chunk.get(storage::EVENT.len()..).unwrap_or_default());
    k
}

/// Merges a stored gone-list (another tab's view) into ours; returns the merged list as
/// [`storage::gone_lines`] reads it.
fn merge_gone(list: &mut String, stored: &str) -> Vec<bool> {
    if !list.is_empty() {
        list.push(storage::LINE as char);
    }
    list.push_str(stored);
    let lines = storage::gone_lines(list);
    list.clear();
    for (l, &gone) in lines.iter().enumerate() {
        if gone {
            queue::append_line(list, l as u32);
        }
    }
    lines
}

/// `tl1:b:<batch id>`: an unconfirmed batch.
fn unconfirmed_key(batch_id: &str) -> String {
    let mut k = String::from(storage::UNCONFIRMED);
    k.push_str(batch_id);
    k
}

fn event_key(id: &str) -> String {
    let mut k = String::with_capacity(storage::EVENT.len() + id.len());
    k.push_str(storage::EVENT);
    k.push_str(id);
    k
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
            tab,
            queue: EventQueue::default(),
            anon: String::new(),
            user: None,
            session: Session::default(),
            context: None,
            retry: RetryState::default(),
            dropped: 0,
            lease: None,
            in_flight: None,
            next_batch: 1,
            split_limit: None,
            online: true,
            blocked: false,
            opted_out: false,
            rejected: 0,
            last_error: None,
            last_sent_at: None,
            actions: Vec::new(),
            open_chunk: None,
            unconfirmed: Vec::new(),
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
        if self.anon.is_empty() {
            self.anon = ids::uuid_v4(&mut self.rng);
            self.actions
                .push(Action::Set(storage::ANON.into(), self.anon.clone()));
        }
        self.enforce_caps();
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

    /// (`entries` is read more than once, hence `Clone`: no copy of the snapshot is made.)
    fn adopt<'a>(
        &mut self,
        entries: impl Iterator<Item = (&'a str, &'a str)> + Clone,
        first: bool,
    ) {
        // Gone-lists first: their lines are not queued, whatever their records say.
        // (first id, list, whether its record was met).
        let mut lists: Vec<(&str, &str, bool)> = Vec::new();
        for (key, value) in entries.clone() {
            if let Some(first_id) = key.strip_prefix(storage::GONE) {
                lists.push((first_id, value, false));
            }
        }
        if !first {
            // Persisted events gone from storage were acknowledged (or cleared) by another
            // tab: those not seen below go. Ours in flight stay until our own answer comes.
            self.queue.mark(|r| r.persisted && !r.in_flight);
        }
        let mut retry = RetryState::default();
        let mut lease = None;
        let mut dropped = 0;
        let mut opted_out = false;
        let mut user = None;
        for (key, value) in entries {
            if let Some(first_id) = key.strip_prefix(storage::EVENT) {
                let mut stored = "";
                for list in lists.iter_mut().filter(|l| l.0 == first_id) {
                    list.2 = true;
                    stored = list.1;
                }
                // The record's entry in the queue: found through one of its queued events
                // (a record is read whole, so no other entry has its key), else made anew.
                let mut chunk = None;
                for line in text::fields(value, storage::LINE) {
                    if let Some(r) =
                        storage::event_line_id(line).and_then(|id| self.queue.get_mut(id))
                    {
                        chunk = Some(r.chunk);
                        break;
                    }
                }
                let chunk = match chunk {
                    Some(c) => c,
                    None => self.queue.new_chunk(key.into()),
                };
                // Its gone lines: ours and the stored ones.
                let gone = match self.queue.chunk(chunk) {
                    Some(c) => merge_gone(&mut c.gone, stored),
                    None => Vec::new(),
                };
                let mut valid = false;
                for (at, line) in text::fields(value, storage::LINE).enumerate() {
                    let Some(id) = storage::event_line_id(line) else {
                        continue;
                    };
                    valid = true;
                    if gone.get(at).is_some_and(|&g| g) {
                        continue;
                    }
                    if let Some(r) = self.queue.get_mut(id) {
                        r.marked = false;
                    } else {
                        let keep = self.is_keep_record(id.len(), line);
                        let record = Record {
                            json: line.into(),
                            keep,
                            persisted: true,
                            chunk,
                            line: at as u32,
                            in_flight: false,
                            held: false,
                            marked: false,
                        };
                        self.queue.insert(id.into(), record);
                    }
                }
                if !valid {
                    self.actions.push(Action::Remove(key.into()));
                }
                continue;
            }
            match key {
                storage::ANON => self.anon = value.into(),
                storage::USER => user = Some(value.to_string()),
                storage::SESSION => {
                    if let Some((id, last)) = storage::split_pair(value) {
                        if last > self.session.last {
                            self.session = Session {
                                id: id.into(),
                                last,
                                persisted_last: last,
                            };
                        }
                    }
                }
                storage::RETRY => retry = RetryState::decode(value).unwrap_or_default(),
                storage::LEASE => {
                    lease = storage::split_pair(value).map(|(t, u)| (t.to_string(), u))
                }
                storage::DROPPED => dropped = text::number(value).unwrap_or(0),
                storage::OPT_OUT => opted_out = true,
                _ => {
                    if let Some(batch_id) = key.strip_prefix(storage::UNCONFIRMED) {
                        if first && !self.unconfirmed.iter().any(|u| u.batch_id == batch_id) {
                            let mut lines = text::fields(value, storage::LINE);
                            let sent_at = lines.next().and_then(text::number).unwrap_or(0);
                            self.unconfirmed.push(Unconfirmed {
                                batch_id: batch_id.into(),
                                sent_at,
                                events: lines.filter(|l| !l.is_empty()).map(String::from).collect(),
                            });
                        }
                    }
                }
            }
        }
        for (first_id, _, met) in lists {
            if !met {
                // Its record is gone: so is the list.
                let mut k = String::from(storage::GONE);
                k.push_str(first_id);
                self.actions.push(Action::Remove(k));
            }
        }
        self.queue.remove_marked(true);
        // (And forgets the records met above with none of their events queued.)
        self.queue.take_touched(|_, _| {});
        self.hold_unconfirmed();
        self.retry = retry;
        self.lease = lease;
        self.dropped = dropped;
        self.opted_out = opted_out;
        self.user = user;
    }

    /// Whether a stored event line is of an `always_keep` event.
    fn is_keep_record(&self, id_len: usize, value: &str) -> bool {
        self.cfg.always_keep.iter().any(|name| {
            let mut literal = String::new();
            push_str_literal(&mut literal, name);
            storage::event_name_is(value, id_len, &literal)
        })
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
        if self.opted_out {
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
        self.touch_session(now);
        let id = self.uuid.next(now, &mut self.rng);
        let mut json = String::with_capacity(
            200 + props_json.map_or(0, str::len) + self.context.as_ref().map_or(0, String::len),
        );
        EventJson {
            id: &id,
            name,
            ts: now,
            anonymous_id: &self.anon,
            session_id: &self.session.id,
            user_id: self.user.as_deref(),
            props: props_json,
            context: self.context.as_deref(),
        }
        .write(&mut json);
        if json.len() > tracklet_wire::MAX_EVENT_BYTES {
            return Err(Skipped::TooLarge);
        }
        let chunk = match self.open_chunk {
            Some(c) => c,
            None => {
                let c = self.queue.new_chunk(event_key(&id));
                self.open_chunk = Some(c);
                c
            }
        };
        // Persisted by the next `take_actions()`, which the binding calls before the task
        // ends: one storage write for all the events of a task.
        self.queue.insert(
            id.clone(),
            Record {
                json,
                keep,
                persisted: false,
                chunk,
                line: 0,
                in_flight: false,
                held: false,
                marked: false,
            },
        );
        Ok(id)
    }

    /// Sets the user id for this and later events (persisted, shared by tabs).
    pub fn identify(&mut self, user_id: &str) {
        self.user = Some(user_id.into());
        self.actions
            .push(Action::Set(storage::USER.into(), user_id.into()));
    }

    /// New anonymous id and session, no user id (for logout).
    pub fn reset(&mut self, now: u64) {
        self.anon = ids::uuid_v4(&mut self.rng);
        self.user = None;
        self.session = Session::default();
        self.actions
            .push(Action::Set(storage::ANON.into(), self.anon.clone()));
        self.actions.push(Action::Remove(storage::USER.into()));
        self.touch_session(now);
    }

    /// Stops tracking (persisted) and discards what is queued.
    pub fn opt_out(&mut self) -> usize {
        self.opted_out = true;
        self.actions
            .push(Action::Set(storage::OPT_OUT.into(), "1".into()));
        self.clear()
    }

    pub fn opt_in(&mut self) {
        self.opted_out = false;
        self.actions.push(Action::Remove(storage::OPT_OUT.into()));
    }

    pub fn opted_out(&self) -> bool {
        self.opted_out
    }

    fn touch_session(&mut self, now: u64) {
        let s = &mut self.session;
        let fresh = s.id.is_empty() || now.saturating_sub(s.last) > self.cfg.session_idle_ms;
        if fresh {
            *s = Session {
                id: ids::uuid_v4(&mut self.rng),
                last: now,
                persisted_last: 0,
            };
        }
        s.last = s.last.max(now);
        if fresh || s.last.saturating_sub(s.persisted_last) >= SESSION_PERSIST_EVERY_MS {
            s.persisted_last = s.last;
            self.actions
                .push(Action::Set(storage::SESSION.into(), pair(&s.id, s.last)));
        }
    }

    /// Another tab wrote the session key (the binding listens for `storage` events).
    pub fn adopt_session(&mut self, value: &str) {
        if let Some((id, last)) = storage::split_pair(value) {
            if last >= self.session.last {
                self.session = Session {
                    id: id.into(),
                    last,
                    persisted_last: last,
                };
            }
        }
    }

    pub fn anonymous_id(&self) -> &str {
        &self.anon
    }

    pub fn session_id(&self) -> &str {
        &self.session.id
    }

    /// Drops the oldest events beyond the count and byte bounds (never `always_keep` ones,
    /// never those in flight), counting them for the next batch's `dropped`.
    fn enforce_caps(&mut self) {
        if self.queue.len() <= self.cfg.max_queue_events
            && self.queue.bytes() <= self.cfg.max_queue_bytes
        {
            return;
        }
        let (max_events, max_bytes) = (self.cfg.max_queue_events, self.cfg.max_queue_bytes);
        let mut count = self.queue.len();
        let mut bytes = self.queue.bytes();
        self.queue.mark(|r| {
            let victim = (count > max_events || bytes > max_bytes) && !r.keep && !r.in_flight;
            if victim {
                count -= 1;
                bytes -= r.json.len();
            }
            victim
        });
        let dropped = self.remove_events();
        if dropped == 0 {
            return;
        }
        self.dropped += dropped as u64;
        let mut d = String::new();
        push_u64(&mut d, self.dropped);
        self.actions.push(Action::Set(storage::DROPPED.into(), d));
    }

    /// The binding could not write this key (quota exceeded, storage disabled): its events
    /// live on in memory only, and a refresh must not mistake them for acknowledged.
    pub fn persist_failed(&mut self, key: &str) {
        let chunk = self.queue.serial_of(key);
        for r in self.queue.iter_mut().filter(|r| Some(r.chunk) == chunk) {
            r.persisted = false;
        }
    }

    /// Discards every queued event that is not in flight; returns how many.
    pub fn clear(&mut self) -> usize {
        self.queue.mark(|r| !r.in_flight);
        let n = self.remove_events();
        self.hold_unconfirmed();
        n
    }

    pub fn set_online(&mut self, online: bool) {
        self.online = online;
    }

    /// Storage changes to carry out now, in order. The queue's bounds are enforced here,
    /// once per task rather than once per `track()`: a burst of thousands of events in one
    /// task then costs one pass over the queue, not one per event (the queue may exceed its
    /// bounds until the task's end).
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.enforce_caps();
        self.write_open_chunk();
        core::mem::take(&mut self.actions)
    }

    /// Writes this task's record: the events tracked since the last `take_actions`.
    fn write_open_chunk(&mut self) {
        let Some(chunk) = self.open_chunk.take() else {
            return;
        };
        let Some(key) = self.queue.chunk(chunk).map(|c| c.key.clone()) else {
            return;
        };
        // A record's events all come at or after its first event (the key's id).
        let first = key.get(storage::EVENT.len()..).unwrap_or_default();
        let mut value = String::new();
        let records = self.queue.iter_mut_from(first).filter(|r| r.chunk == chunk);
        for (line, r) in records.enumerate() {
            if line > 0 {
                value.push(storage::LINE as char);
            }
            value.push_str(&r.json);
            r.persisted = true;
            r.line = line as u32;
        }
        if !value.is_empty() {
            self.actions.push(Action::Set(key, value));
        }
    }

    /// Events not yet acknowledged, in flight included.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    pub fn status(&self) -> Status {
        Status {
            pending: self.queue.len(),
            in_flight: self.in_flight.as_ref().map_or(0, |f| f.events),
            last_error: self.last_error.clone(),
            last_sent_at: self.last_sent_at,
            next_retry_at: (self.retry.failures > 0 || self.retry.not_before > 0)
                .then(|| self.retry.next_at.max(self.retry.not_before)),
            online: self.online,
            rejected: self.rejected,
            dropped: self.dropped,
            opted_out: self.opted_out,
        }
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

    fn oldest_ms(&self) -> Option<u64> {
        let (id, _) = self.queue.iter().find(|(_, r)| !r.in_flight && !r.held)?;
        Some(ids::uuid_v7_ms(id).unwrap_or(0))
    }

    /// Whether a batch is due now (for `force`, whenever anything is queued), given the
    /// batching rules, backoff, `Retry-After`, connectivity and the other tabs' lease.
    fn may_send(&self, now: u64, force: bool) -> bool {
        if self.in_flight.is_some()
            || !self.online
            || self.blocked
            || self.opted_out
            || self.queue.is_empty()
        {
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
            || self.queue.len() >= self.cfg.max_batch_size
            || self
                .oldest_ms()
                .is_some_and(|t| t.saturating_add(self.cfg.max_wait_ms) <= now)
    }

    /// Whether [`Core::poll_send`] would answer a batch now (not forced).
    pub fn poll_due(&self, now: u64) -> bool {
        self.may_send(now, false) && self.oldest_ms().is_some()
    }

    /// The next batch to send, if one is due. While it is in flight no other batch is
    /// started; report its fate with [`Core::on_result`].
    pub fn poll_send(&mut self, now: u64, force: bool) -> Option<Outgoing> {
        if !self.may_send(now, force) || self.oldest_ms().is_none() {
            return None;
        }
        // A backlog (a burst, or what queued up during an outage) goes in bigger requests,
        // bounded by the collector's cap and the request size: it drains in a few round
        // trips instead of reaching the queue's bounds.
        let backlog = self.queue.len() > self.cfg.max_batch_size;
        let normal = if backlog {
            tracklet_wire::MAX_EVENTS_PER_BATCH
        } else {
            self.cfg.max_batch_size
        };
        let limit = self
            .split_limit
            .unwrap_or(normal)
            .clamp(1, tracklet_wire::MAX_EVENTS_PER_BATCH);
        let batch_id = ids::uuid_v4(&mut self.rng);
        let (events, body) = self.build_body(now, limit, &batch_id);
        // The batch holds the first `events` events not in flight nor held.
        for r in self.queue.iter_mut().filter(|r| !r.held).take(events) {
            r.in_flight = true;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.in_flight = Some(InFlight {
            batch,
            batch_id: batch_id.clone(),
            events,
            dropped: self.dropped,
        });
        self.lease = Some((self.tab.clone(), now + self.cfg.lease_ms));
        self.actions.push(Action::Set(
            storage::LEASE.into(),
            pair(&self.tab, now + self.cfg.lease_ms),
        ));
        Some(Outgoing {
            batch,
            batch_id,
            body,
            events,
        })
    }

    /// Up to `limit` of the oldest events not in flight, as a gzip body under the
    /// request cap (halving the count until it fits).
    fn build_body(&self, now: u64, limit: usize, batch_id: &str) -> (usize, Vec<u8>) {
        let mut n = limit;
        loop {
            let mut batch = BatchJson::with_batch_id(now, self.dropped, batch_id);
            let mut events = 0;
            for (_, r) in self.queue.iter() {
                if events == n {
                    break;
                }
                if !r.in_flight && !r.held {
                    batch.push_raw_event(&r.json);
                    events += 1;
                }
            }
            let body = gzip::gzip(batch.finish().as_bytes());
            if body.len() <= tracklet_wire::SDK_MAX_REQUEST_BYTES || events <= 1 {
                return (events, body);
            }
            n = events / 2;
        }
    }

    /// Reports what became of batch `batch`.
    pub fn on_result(&mut self, batch: u64, outcome: Outcome, now: u64) {
        let Some(flight) = self.in_flight.take_if(|f| f.batch == batch) else {
            return;
        };
        // Its answer came after all (a page back from the back-forward cache).
        self.forget_unconfirmed(&flight.batch_id);
        self.settle(flight, outcome, now);
        for r in self.queue.iter_mut() {
            r.in_flight = false;
        }
        // Last, after the removals: a tab that sees the lease gone also sees them (one
        // tab's storage writes reach the others in order), so it never resends them.
        self.release_lease();
    }

    fn settle(&mut self, flight: InFlight, outcome: Outcome, now: u64) {
        let n = flight.events;
        // `status().lastError`: text, a number, text (the number left out when 0).
        let error: (&str, u64, &str) = match outcome {
            Outcome::Accepted { rejected } => {
                let rejected = rejected.iter().filter(|&&i| i < n).count() as u64;
                self.rejected += rejected;
                self.remove_in_flight();
                self.last_sent_at = Some(now);
                self.split_limit = None;
                self.reset_retry();
                if flight.dropped > 0 {
                    self.dropped = self.dropped.saturating_sub(flight.dropped);
                    self.actions.push(if self.dropped == 0 {
                        Action::Remove(storage::DROPPED.into())
                    } else {
                        let mut d = String::new();
                        push_u64(&mut d, self.dropped);
                        Action::Set(storage::DROPPED.into(), d)
                    });
                }
                ("", rejected, " events rejected by the collector")
            }
            Outcome::BadRequest => {
                self.rejected += n as u64;
                self.remove_in_flight();
                self.reset_retry();
                ("HTTP ", 400, ": batch rejected by the collector")
            }
            Outcome::TooLarge if n > 1 => {
                self.split_limit = Some(n / 2);
                ("HTTP ", 413, ": batch too large, splitting it")
            }
            Outcome::TooLarge => {
                self.rejected += 1;
                self.remove_in_flight();
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
                let delay = self
                    .cfg
                    .backoff
                    .delay_ms(self.retry.failures, &mut self.rng);
                self.retry.not_before = retry_after_ms.map_or(0, |ra| now + ra);
                self.retry.next_at = (now + delay).max(self.retry.not_before);
                self.actions
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
    fn release_lease(&mut self) {
        if self
            .lease
            .as_ref()
            .is_some_and(|(owner, _)| *owner == self.tab)
        {
            self.lease = None;
            self.actions.push(Action::Remove(storage::LEASE.into()));
        }
    }

    /// Removes the batch in flight from the queue and from storage.
    fn remove_in_flight(&mut self) {
        self.queue.mark(|r| r.in_flight);
        self.remove_events();
    }

    /// Removes the marked events from the queue and from storage: a record with none of
    /// its events left is removed, otherwise their lines join the record's gone-list.
    /// Records are never rewritten (see [`storage::EVENT`]). Returns how many went.
    fn remove_events(&mut self) -> usize {
        let removed = self.queue.remove_marked(false);
        let (actions, open) = (&mut self.actions, &mut self.open_chunk);
        self.queue.take_touched(|c, emptied| {
            if !emptied {
                actions.push(Action::Set(gone_key(&c.key), c.gone.clone()));
            } else if *open == Some(c.serial) {
                // Never written: nothing to remove, and this task's next events start a
                // new record.
                *open = None;
            } else {
                actions.push(Action::Remove(gone_key(&c.key)));
                actions.push(Action::Remove(c.key.clone()));
            }
        });
        removed
    }

    fn reset_retry(&mut self) {
        if self.retry != RetryState::default() {
            self.retry = RetryState::default();
            self.actions.push(Action::Remove(storage::RETRY.into()));
        }
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
        self.release_lease();
        if let Some(flight) = &self.in_flight {
            let ids = self.ids_where(|r| r.in_flight);
            let batch_id = flight.batch_id.clone();
            self.remember_unconfirmed(batch_id, now, ids);
        }
        if !self.online || self.blocked || self.opted_out || now < self.retry.not_before {
            return None;
        }
        let batch_id = ids::uuid_v4(&mut self.rng);
        let (events, body) = self.build_body(now, tracklet_wire::MAX_EVENTS_PER_BATCH, &batch_id);
        if events == 0 {
            return None;
        }
        let mut ids = Vec::with_capacity(events);
        for (id, r) in self.queue.iter() {
            if ids.len() == events {
                break;
            }
            if !r.in_flight && !r.held {
                ids.push(id.clone());
            }
        }
        self.remember_unconfirmed(batch_id, now, ids);
        Some(body)
    }

    fn ids_where(&self, f: impl Fn(&queue::Record) -> bool) -> Vec<String> {
        let mut ids = Vec::new();
        for (id, r) in self.queue.iter() {
            if f(r) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// Writes `tl1:b:<batch id>` (`<sent at>` then the event ids, one per line) and holds
    /// the events back.
    fn remember_unconfirmed(&mut self, batch_id: String, sent_at: u64, events: Vec<String>) {
        let mut value = String::new();
        push_u64(&mut value, sent_at);
        for id in &events {
            value.push(storage::LINE as char);
            value.push_str(id);
        }
        self.actions
            .push(Action::Set(unconfirmed_key(&batch_id), value));
        self.unconfirmed.retain(|u| u.batch_id != batch_id);
        self.unconfirmed.push(Unconfirmed {
            batch_id,
            sent_at,
            events,
        });
        self.hold_unconfirmed();
    }

    fn forget_unconfirmed(&mut self, batch_id: &str) {
        let before = self.unconfirmed.len();
        self.unconfirmed.retain(|u| u.batch_id != batch_id);
        if self.unconfirmed.len() != before {
            self.actions.push(Action::Remove(unconfirmed_key(batch_id)));
        }
    }

    /// Marks the queued events of unconfirmed batches as held (not sent until confirmed);
    /// forgets unconfirmed batches none of whose events is queued any more.
    fn hold_unconfirmed(&mut self) {
        let mut gone = Vec::new();
        for u in &self.unconfirmed {
            let mut any = false;
            for id in &u.events {
                if let Some(r) = self.queue.get_mut(id) {
                    if !r.in_flight {
                        r.held = true;
                    }
                    any = true;
                }
            }
            if !any {
                gone.push(u.batch_id.clone());
            }
        }
        for id in gone {
            self.forget_unconfirmed(&id);
        }
    }

    /// The unconfirmed batches to ask the collector about now, if any: those sent at
    /// least `delay_ms` ago (a beacon may still be on its way to the database).
    pub fn unconfirmed_due(&self, now: u64, delay_ms: u64) -> Option<Vec<String>> {
        let due: Vec<String> = self
            .unconfirmed
            .iter()
            .filter(|u| u.sent_at.saturating_add(delay_ms) <= now)
            .map(|u| u.batch_id.clone())
            .take(tracklet_wire::MAX_BATCH_IDS_PER_QUERY)
            .collect();
        (!due.is_empty()).then_some(due)
    }

    /// When the oldest unconfirmed batch becomes due for the question, if any.
    pub fn unconfirmed_at(&self, delay_ms: u64) -> Option<u64> {
        self.unconfirmed
            .iter()
            .map(|u| u.sent_at.saturating_add(delay_ms))
            .min()
    }

    pub fn has_unconfirmed(&self) -> bool {
        !self.unconfirmed.is_empty()
    }

    /// The collector's answer about the unconfirmed batches `asked`: `arrived` lists those
    /// it committed (their events are acknowledged and leave the queue), `None` when it
    /// could not say (no answer, an error): then, as for those not listed, their events
    /// are released and sent again (the collector drops duplicates by event id).
    /// Returns how many events were acknowledged.
    pub fn confirm(&mut self, asked: &[String], arrived: Option<&[String]>) -> usize {
        let mut acknowledged = 0;
        for batch_id in asked {
            let Some(at) = self
                .unconfirmed
                .iter()
                .position(|u| &u.batch_id == batch_id)
            else {
                continue;
            };
            let u = self.unconfirmed.remove(at);
            self.actions.push(Action::Remove(unconfirmed_key(batch_id)));
            let came = arrived.is_some_and(|a| a.contains(batch_id));
            for id in &u.events {
                if let Some(r) = self.queue.get_mut(id) {
                    if !r.in_flight {
                        r.held = false;
                        r.marked = came;
                    }
                }
            }
            if came {
                acknowledged += self.remove_events();
            }
        }
        // An event in two unconfirmed batches stays held by the other.
        self.hold_unconfirmed();
        acknowledged
    }

    /// When the binding should call [`Core::poll_send`] next, if ever (an `online` event,
    /// a new `track()` or an answer may bring it forward).
    pub fn next_wake(&self) -> Option<u64> {
        if self.in_flight.is_some() || !self.online || self.blocked || self.opted_out {
            return None;
        }
        let oldest = self.oldest_ms()?;
        let due = if self.retry.failures > 0 {
            self.retry.next_at
        } else if self.queue.len() >= self.cfg.max_batch_size {
            0
        } else {
            oldest.saturating_add(self.cfg.max_wait_ms)
        };
        let mut t = due.max(self.retry.not_before);
        if let Some((owner, until)) = &self.lease {
            if *owner != self.tab {
                t = t.max(*until);
            }
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests;
