//! The tracker's rules around the queue, as one sans-IO state machine: what the browser
//! driver (`sdk-wasm`) feeds in (page events, timers, the collector's answers, the
//! cross-tab lock) and the [`Output`]s it carries out, in the style of str0m.
//!
//! The driver calls an input method, then [`Tracker::poll_output`] until it answers
//! [`Output::Wake`]. Nothing here blocks or waits: a wait is a wake-up time.

use alloc::string::String;
use alloc::vec::Vec;

use crate::{storage, Action, Core, Outcome, Settings, Skipped, Status};

/// After the lock was busy (another tab is sending), look again this much later (ms).
const RETRY_SOON_MS: u64 = 1_000;
/// `forceSend()` waits at most this long (ms) for another tab's lease to be released
/// before giving up: localStorage writes reach other tabs a little late, and the removals
/// that come with a release must be seen before this tab sends (or it would resend them).
const LEASE_WAIT_MS: u64 = 3_000;
/// How often a waiting `forceSend()` looks again at the lease (ms).
const LEASE_POLL_MS: u64 = 20;
/// An unconfirmed batch is asked about once it is this old (ms): a beacon sent as the
/// last page unloaded may still be on its way into the collector's database.
const CONFIRM_DELAY_MS: u64 = 1_000;

/// What the driver does next.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Carry out this storage change now (a failed write is reported with
    /// [`Tracker::persist_failed`]).
    Persist(Action),
    /// Send this body; report the answer with [`Tracker::response`] (or, for a
    /// [`TransmitKind::Confirm`], [`Tracker::confirmation`]).
    Transmit(Transmit),
    /// Take the cross-tab send lock (Web Locks `tracklet:send`), then call
    /// [`Tracker::lock_acquired`] or [`Tracker::lock_unavailable`]. `wait`: queue for it
    /// (up to 30 s) rather than give up if another tab holds it.
    Lock { wait: bool },
    /// Release the send lock.
    Unlock,
    /// Read every `tl1:` key and pass them to [`Tracker::refresh`] (other tabs wrote).
    ReadStorage,
    /// The `forceSend()` numbered `id` is done: `sent` events acknowledged.
    Flushed { id: u32, sent: u64 },
    /// `status()` changed (tell the `onStatus()` listeners).
    StatusChanged,
    /// Nothing more to do now: call [`Tracker::timeout`] at this time (ms), if any.
    Wake(Option<u64>),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Transmit {
    pub kind: TransmitKind,
    pub url: String,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransmitKind {
    /// A batch (`fetch` with `keepalive`); the number to pass back to
    /// [`Tracker::response`].
    Batch(u64),
    /// The page is going away: `sendBeacon`, no answer expected.
    Beacon,
    /// The question which unconfirmed batches arrived (`fetch`); the answer goes to
    /// [`Tracker::confirmation`].
    Confirm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lock {
    Free,
    Requested { wait: bool },
    Held,
}

/// A `forceSend()` in progress: send batch after batch, skipping the backoff wait (never
/// a `Retry-After`), until nothing is left or a send fails.
#[derive(Debug, Default)]
struct Drain {
    /// The `forceSend()` calls waiting: (id, `sent` when they joined).
    waiters: Vec<(u32, u64)>,
    /// Events acknowledged since the drain started.
    sent: u64,
    /// While another tab's lease shows: until when to wait for its release.
    lease_wait_until: Option<u64>,
    /// While waiting so: when to look again.
    look_again_at: Option<u64>,
}

pub struct Tracker {
    core: Core,
    settings: Settings,
    /// Tracking is off for good on this page (no endpoint or key, or a privacy signal).
    inert: bool,
    /// Outputs not yet polled, in order.
    out: Vec<Output>,
    lock: Lock,
    /// Another tab wrote a `tl1:` key since this one last read storage.
    others_wrote: bool,
    /// Waiting for [`Tracker::refresh`] before sending.
    awaiting_storage: bool,
    /// A batch is on the wire (its number).
    sending: Option<u64>,
    drain: Option<Drain>,
    next_flush: u32,
    retry_soon_at: Option<u64>,
    /// The batch ids asked about by the question on the wire.
    confirming: Option<Vec<String>>,
    unloading: bool,
    status: Option<Status>,
    http_date: HttpDateParser,
}

/// Reads an HTTP date (`Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`) as ms since the
/// epoch. The browser has one (`Date.parse`), so the wasm does not carry a second; host
/// tests use the httpdate crate.
pub type HttpDateParser = fn(&str) -> Option<u64>;

impl Tracker {
    /// A tracker with these settings. `seed` must differ between tabs (the driver draws it
    /// from `crypto.getRandomValues`); `privacy_signal`: the browser sends Do Not Track or
    /// Global Privacy Control. Call [`Tracker::start`] next.
    pub fn new(
        settings: Settings,
        seed: u64,
        privacy_signal: bool,
        http_date: HttpDateParser,
    ) -> Self {
        let inert = !settings.usable() || (privacy_signal && settings.respect_privacy_signals);
        Tracker {
            core: Core::new(settings.config.clone(), seed),
            settings,
            inert,
            out: Vec::new(),
            lock: Lock::Free,
            others_wrote: false,
            awaiting_storage: false,
            sending: None,
            drain: None,
            next_flush: 1,
            retry_soon_at: None,
            confirming: None,
            unloading: false,
            status: None,
            http_date,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether this tracker does nothing (see [`Tracker::new`]).
    pub fn is_inert(&self) -> bool {
        self.inert
    }

    /// Loads what storage holds (every `tl1:` key with its value). Returns the calls the
    /// page made before the wasm was ready (`tl1:p:` keys, kept by the JavaScript entry),
    /// oldest first, for the driver to replay; their keys are removed.
    pub fn start<'a, I>(&mut self, entries: I, online: bool, now: u64) -> Vec<(String, String)>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: Clone,
    {
        let entries = entries.into_iter();
        // Kept sorted by key (time, then sequence) as they are read: a binary-search
        // insert is a few instructions where a sort would add 2 KB of wasm.
        let mut early: Vec<(String, String)> = Vec::new();
        for (k, v) in entries.clone() {
            if k.starts_with(storage::PRE_READY) {
                let at = early.partition_point(|(e, _)| e.as_str() < k);
                early.insert(at, (k.into(), v.into()));
            }
        }
        for (k, _) in &early {
            self.out.push(Output::Persist(Action::Remove(k.clone())));
        }
        if self.inert {
            return Vec::new();
        }
        self.core.restore(entries);
        self.core.set_online(online);
        self.end_task(now);
        early
    }

    /// Page context (a JSON object) added to every later event.
    pub fn set_context(&mut self, context_json: Option<String>) {
        self.core.set_context(context_json);
    }

    /// Queues one event (`props_json`: a JSON object, from `JSON.stringify`). Call
    /// [`Tracker::end_task`] before the task ends: the events of one task are written
    /// to storage together, in one write.
    pub fn track(
        &mut self,
        name: &str,
        props_json: Option<&str>,
        now: u64,
    ) -> Result<String, Skipped> {
        if self.inert {
            return Err(Skipped::OptedOut);
        }
        self.core.track(name, props_json, now)
    }

    /// The end of a task that tracked or changed something: its storage writes, the
    /// queue's bounds, and a send if one is due.
    pub fn end_task(&mut self, now: u64) {
        self.take_actions();
        self.pump(now);
    }

    pub fn identify(&mut self, user_id: &str, now: u64) {
        if !self.inert {
            self.core.identify(user_id);
            self.end_task(now);
        }
    }

    pub fn reset(&mut self, now: u64) {
        if !self.inert {
            self.core.reset(now);
            self.end_task(now);
        }
    }

    /// Stops tracking (persisted) and discards the queue; returns how many events went.
    pub fn opt_out(&mut self, now: u64) -> usize {
        if self.inert {
            return 0;
        }
        let n = self.core.opt_out();
        self.end_task(now);
        n
    }

    pub fn opt_in(&mut self, now: u64) {
        if !self.inert {
            self.core.opt_in();
            self.end_task(now);
        }
    }

    /// Whether [`Tracker::clear`] wants a fresh read of storage (other tabs wrote).
    pub fn wants_storage(&self) -> bool {
        self.others_wrote
    }

    /// Discards the queued events (not those in flight); returns how many.
    /// `entries`: storage, when [`Tracker::wants_storage`] said so.
    pub fn clear<'a, I>(&mut self, entries: Option<I>, now: u64) -> usize
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: Clone,
    {
        if self.inert {
            return 0;
        }
        if let Some(e) = entries {
            self.others_wrote = false;
            self.core.refresh(e);
        }
        let n = self.core.clear();
        self.end_task(now);
        n
    }

    pub fn pending(&self) -> usize {
        self.core.pending()
    }

    pub fn status(&self) -> Status {
        self.core.status()
    }

    /// `forceSend()`: sends everything now (after the batch in flight), skipping the
    /// backoff wait but never a server's `Retry-After`. Returns the id that the
    /// [`Output::Flushed`] answering it carries.
    pub fn force_send(&mut self, now: u64) -> u32 {
        let id = self.next_flush;
        self.next_flush = self.next_flush.wrapping_add(1);
        if self.inert {
            self.out.push(Output::Flushed { id, sent: 0 });
            return id;
        }
        let drain = self.drain.get_or_insert_with(Drain::default);
        drain.waiters.push((id, drain.sent));
        self.resume(now);
        id
    }

    /// The wake-up time asked for by the last [`Output::Wake`] has come.
    pub fn timeout(&mut self, now: u64) {
        if self.inert {
            return;
        }
        if self.retry_soon_at.is_some_and(|t| t <= now) {
            self.retry_soon_at = None;
        }
        if let Some(d) = &mut self.drain {
            d.look_again_at = None;
        }
        self.resume(now);
    }

    /// The send lock is this tab's: send what is due.
    pub fn lock_acquired(&mut self, now: u64) {
        if self.lock != Lock::Held {
            self.lock = Lock::Held;
            self.continue_send(now);
        }
    }

    /// Another tab holds the send lock (or waiting for it failed).
    pub fn lock_unavailable(&mut self, now: u64) {
        let Lock::Requested { wait: waited } = self.lock else {
            return;
        };
        self.lock = Lock::Free;
        match &self.drain {
            // A forceSend() came while asking without waiting: ask again, waiting.
            Some(_) if !waited => self.pump(now),
            Some(_) => self.finish_drain(),
            None => self.retry_soon_at = Some(now + RETRY_SOON_MS),
        }
    }

    /// What storage holds now, after an [`Output::ReadStorage`].
    pub fn refresh<'a, I>(&mut self, entries: I, now: u64)
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: Clone,
    {
        self.others_wrote = false;
        self.core.refresh(entries);
        if self.awaiting_storage {
            self.awaiting_storage = false;
            self.continue_send(now);
        }
    }

    /// A `storage` event: another tab wrote `key` (`None`: it cleared storage).
    pub fn storage_changed(&mut self, key: Option<&str>, new_value: Option<&str>, now: u64) {
        if self.inert || !key.is_none_or(|k| k.starts_with(storage::PREFIX)) {
            return;
        }
        self.others_wrote = true;
        match (key, new_value) {
            (Some(storage::SESSION), Some(v)) => self.core.adopt_session(v),
            // The sending tab let go: what waited for it may go now.
            (Some(storage::LEASE), None) => {
                self.core.adopt_lease(None);
                self.resume(now);
            }
            _ => {}
        }
    }

    /// The browser's `online`/`offline` events.
    pub fn set_online(&mut self, online: bool, now: u64) {
        self.core.set_online(online);
        if online {
            self.pump(now);
        }
    }

    /// A storage write failed (quota exceeded, storage disabled): its events live on in
    /// memory only.
    pub fn persist_failed(&mut self, key: &str) {
        self.core.persist_failed(key);
    }

    /// The page was hidden (`visibilitychange`): send now, while it can still hear the
    /// answer, unless it is unloading (then the beacon has done the job).
    pub fn page_hidden(&mut self, now: u64) {
        if !self.inert && !self.unloading && self.drain.is_none() {
            self.drain = Some(Drain::default());
            self.pump(now);
        }
    }

    /// `pagehide`: the page may be going away. Hands the queued events (as many as one
    /// request under 60 KB holds) to a beacon, which outlives the page; they stay stored,
    /// as unconfirmed, until the next page learns whether they arrived.
    pub fn page_hide(&mut self, now: u64) {
        if self.inert {
            return;
        }
        self.unloading = true;
        self.take_actions();
        if let Some(body) = self.core.unload_body(now) {
            self.out.push(Output::Transmit(Transmit {
                kind: TransmitKind::Beacon,
                url: self.settings.batch_url(),
                body,
            }));
        }
        self.take_actions();
    }

    /// `pageshow`: back from the back-forward cache, the page lives again.
    pub fn page_show(&mut self, now: u64) {
        self.unloading = false;
        self.pump(now);
    }

    /// The collector's answer to batch `batch`: the HTTP status (0 for a network error),
    /// its `Retry-After` header, and for a 2xx the indices its `rejected` list names.
    /// Returns how many events it took.
    pub fn response(
        &mut self,
        batch: u64,
        status: u16,
        retry_after: Option<&str>,
        rejected: Vec<usize>,
        now: u64,
    ) -> usize {
        if self.sending != Some(batch) {
            return 0;
        }
        self.sending = None;
        let Status {
            in_flight, online, ..
        } = self.core.status();
        let outcome = match status {
            200..=299 => Outcome::Accepted { rejected },
            // A network error while the browser says it is offline costs no attempt.
            0 if !online => Outcome::Offline,
            400 => Outcome::BadRequest,
            401 | 403 => Outcome::Unauthorized { status },
            413 => Outcome::TooLarge,
            // Network errors, 408, 429, 5xx and anything unexpected: keep and back off.
            _ => Outcome::Retry {
                status,
                retry_after_ms: retry_after.and_then(|v| retry_after_ms(v, now, self.http_date)),
            },
        };
        let taken = if matches!(outcome, Outcome::Accepted { .. }) {
            in_flight
        } else {
            0
        };
        self.core.on_result(batch, outcome, now);
        self.take_actions();
        match &mut self.drain {
            Some(d) if taken > 0 => {
                d.sent += taken as u64;
                self.continue_send(now);
            }
            Some(_) => {
                self.finish_drain();
                self.unlock();
            }
            None => {
                self.unlock();
                self.pump(now);
            }
        }
        taken
    }

    /// The collector's answer to the question which unconfirmed batches arrived: the
    /// ids it lists, or `None` when there was no usable answer (then their events are sent
    /// again; the collector drops duplicates).
    pub fn confirmation(&mut self, arrived: Option<Vec<String>>, now: u64) {
        let Some(asked) = self.confirming.take() else {
            return;
        };
        let acknowledged = self.core.confirm(&asked, arrived.as_deref());
        if let Some(d) = &mut self.drain {
            d.sent += acknowledged as u64;
        }
        self.take_actions();
        self.pump(now);
    }

    /// The next thing for the driver to do; [`Output::Wake`] when there is nothing more.
    pub fn poll_output(&mut self) -> Output {
        // A handful of outputs at most are queued at once, so shifting a Vec is cheap; a
        // VecDeque measured 218 B more gzipped wasm for nothing a benchmark could see.
        if !self.out.is_empty() {
            return self.out.remove(0);
        }
        if let Some(status) = &self.status {
            let now = self.core.status();
            if *status != now {
                self.status = Some(now);
                return Output::StatusChanged;
            }
        }
        Output::Wake(self.next_wake())
    }

    /// Tell [`Output::StatusChanged`] from now on (someone listens).
    pub fn watch_status(&mut self) {
        if self.status.is_none() {
            self.status = Some(self.core.status());
        }
    }

    fn take_actions(&mut self) {
        for a in self.core.take_actions() {
            self.out.push(Output::Persist(a));
        }
    }

    fn next_wake(&self) -> Option<u64> {
        if self.inert || self.unloading {
            return None;
        }
        let mut wake: Option<u64> = None;
        let mut at = |t: Option<u64>| {
            if let Some(t) = t {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        };
        if let Some(t) = self.drain.as_ref().and_then(|d| d.look_again_at) {
            return Some(t);
        }
        if self.confirming.is_none() {
            at(self.core.unconfirmed_at(CONFIRM_DELAY_MS));
        }
        if self.lock == Lock::Free {
            match self.retry_soon_at {
                Some(t) => at(Some(t)),
                None => at(self.core.next_wake()),
            }
        }
        wake
    }

    /// Starts what is due: the question about unconfirmed batches, or taking the lock to
    /// send (which [`Tracker::lock_acquired`] continues).
    fn pump(&mut self, now: u64) {
        if self.inert || self.unloading {
            return;
        }
        // Unconfirmed batches are asked about first (a forceSend() asks at once): their
        // events are held back until then.
        if self.confirming.is_none() {
            let delay = if self.drain.is_some() {
                0
            } else {
                CONFIRM_DELAY_MS
            };
            if let Some(asked) = self.core.unconfirmed_due(now, delay) {
                self.ask_confirmation(asked);
            }
        }
        if self.lock != Lock::Free || self.retry_soon_at.is_some_and(|t| now < t) {
            return;
        }
        let draining = self.drain.is_some();
        if draining && self.confirming.is_some() {
            // The drain starts once the collector has answered.
            return;
        }
        if draining || self.core.poll_due(now) {
            self.lock = Lock::Requested { wait: draining };
            self.out.push(Output::Lock { wait: draining });
        }
    }

    fn ask_confirmation(&mut self, asked: Vec<String>) {
        let mut body = String::from("{\"");
        body.push_str(tracklet_wire::field::BATCH_IDS);
        body.push_str("\":[");
        for (i, id) in asked.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            tracklet_wire::json::push_str_literal(&mut body, id);
        }
        body.push_str("]}");
        self.out.push(Output::Transmit(Transmit {
            kind: TransmitKind::Confirm,
            url: self.settings.batch_status_url(),
            body: body.into_bytes(),
        }));
        self.confirming = Some(asked);
    }

    /// With the lock held: the next batch, or the end of this turn.
    fn continue_send(&mut self, now: u64) {
        if self.sending.is_some() {
            return;
        }
        if self.others_wrote {
            // Other tabs' events and acknowledgements first.
            self.awaiting_storage = true;
            self.out.push(Output::ReadStorage);
            return;
        }
        let force = self.drain.is_some();
        if let Some(out) = self.core.poll_send(now, force) {
            if let Some(d) = &mut self.drain {
                d.lease_wait_until = None;
                d.look_again_at = None;
            }
            self.take_actions();
            self.sending = Some(out.batch);
            self.out.push(Output::Transmit(Transmit {
                kind: TransmitKind::Batch(out.batch),
                url: self.settings.batch_url(),
                body: out.body,
            }));
            return;
        }
        self.take_actions();
        if let Some(d) = &mut self.drain {
            // Another tab's lease still shows: its last answer (and the removals before
            // its release) may not have reached this tab yet. Wait for it rather than
            // resend what it sent.
            if self.core.lease_held_elsewhere(now).is_some() {
                let until = *d.lease_wait_until.get_or_insert(now + LEASE_WAIT_MS);
                if now < until {
                    self.others_wrote = true;
                    d.look_again_at = Some(now + LEASE_POLL_MS);
                    return;
                }
            }
            self.finish_drain();
        }
        self.unlock();
    }

    fn finish_drain(&mut self) {
        if let Some(d) = self.drain.take() {
            for (id, joined) in d.waiters {
                self.out.push(Output::Flushed {
                    id,
                    sent: d.sent - joined,
                });
            }
        }
    }

    /// With the lock held and nothing awaited (no answer, no storage read): the next
    /// step of this turn; otherwise, whatever is due.
    fn resume(&mut self, now: u64) {
        if self.lock == Lock::Held && self.sending.is_none() && !self.awaiting_storage {
            self.continue_send(now);
        } else {
            self.pump(now);
        }
    }

    fn unlock(&mut self) {
        if self.lock == Lock::Held {
            self.out.push(Output::Unlock);
        }
        self.lock = Lock::Free;
    }
}

/// `Retry-After` as a delay in ms from `now`: delta-seconds or an HTTP date (read by
/// `http_date`); `None` for anything else.
pub fn retry_after_ms(value: &str, now: u64, http_date: HttpDateParser) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    Some(http_date(v)?.saturating_sub(now))
}

#[cfg(test)]
mod tests {
    //! The tracker driven as the browser driver does, with a map for localStorage and
    //! the collector's answers made up by the test.

    use super::*;
    use crate::memory::Storage;
    use crate::options::{Loose, Options};
    use alloc::vec;

    fn http_date(v: &str) -> Option<u64> {
        let t = httpdate::parse_http_date(v).ok()?;
        Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
    }

    fn settings(batch: f64, wait: f64) -> Settings {
        Options {
            endpoint: Loose::Text("https://c.example/".into()),
            api_key: Loose::Text("k".into()),
            max_batch_size: Loose::Number(batch),
            max_wait_time: Loose::Number(wait),
            ..Options::default()
        }
        .settings()
    }

    fn start(
        st: &mut Storage,
        s: Settings,
        seed: u64,
        now: u64,
    ) -> (Tracker, Vec<(String, String)>) {
        let mut t = Tracker::new(s, seed, false, http_date);
        let snap = st.clone();
        let early = t.start(crate::memory::entries(&snap), true, now);
        (t, early)
    }

    /// Polls until `Wake`, carrying out storage changes; returns the other outputs and
    /// the wake-up time.
    fn run(t: &mut Tracker, st: &mut Storage) -> (Vec<Output>, Option<u64>) {
        let mut out = Vec::new();
        loop {
            match t.poll_output() {
                Output::Persist(Action::Set(k, v)) => {
                    st.insert(k, v);
                }
                Output::Persist(Action::Remove(k)) => {
                    st.remove(&k);
                }
                Output::Wake(at) => return (out, at),
                o => out.push(o),
            }
        }
    }

    fn batch_of(out: &[Output]) -> Option<u64> {
        out.iter().find_map(|o| match o {
            Output::Transmit(Transmit {
                kind: TransmitKind::Batch(b),
                ..
            }) => Some(*b),
            _ => None,
        })
    }

    /// Whether the only output is the question which unconfirmed batches arrived.
    fn only_asks(out: &[Output]) -> bool {
        matches!(
            out,
            [Output::Transmit(Transmit {
                kind: TransmitKind::Confirm,
                ..
            })]
        )
    }

    fn flushed(out: &[Output]) -> Option<u64> {
        out.iter().find_map(|o| match o {
            Output::Flushed { sent, .. } => Some(*sent),
            _ => None,
        })
    }

    fn track(t: &mut Tracker, st: &mut Storage, n: usize, now: u64) -> (Vec<Output>, Option<u64>) {
        for i in 0..n {
            t.track("Song Played", Some(&alloc::format!("{{\"seq\":{i}}}")), now)
                .unwrap();
        }
        t.end_task(now);
        run(t, st)
    }

    #[test]
    fn a_batch_goes_when_due_under_the_lock_and_is_forgotten_once_acknowledged() {
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(10.0, 5_000.0), 1, 0);
        let (out, wake) = track(&mut t, &mut st, 3, 1_000);
        assert!(out.is_empty(), "nothing due yet: {out:?}");
        assert_eq!(wake, Some(6_000), "the oldest event's wait");
        assert_eq!(crate::storage::EVENT, "tl1:e:");
        assert!(
            st.keys().any(|k| k.starts_with("tl1:e:")),
            "stored by the end of the task"
        );
        t.timeout(6_000);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: false }]);
        t.lock_acquired(6_001);
        let (out, wake) = run(&mut t, &mut st);
        let batch = batch_of(&out).expect("a batch");
        match &out[0] {
            Output::Transmit(tx) => assert_eq!(tx.url, "https://c.example/v1/batch?key=k"),
            o => panic!("{o:?}"),
        }
        assert_eq!(wake, None, "nothing else until the answer");
        assert_eq!(t.response(batch, 200, None, vec![], 6_050), 3);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Unlock]);
        assert_eq!(t.pending(), 0);
        assert!(!st.keys().any(|k| k.starts_with("tl1:e:")));
    }

    #[test]
    fn force_send_drains_batch_after_batch_and_reports_what_it_sent() {
        let mut st = Storage::new();
        let mut s = settings(2_000.0, 600_000.0);
        s.config.max_queue_events = 5_000;
        let (mut t, _) = start(&mut st, s, 1, 0);
        // Batches hold at most 1,000 events: 1,500 take two.
        track(&mut t, &mut st, 1_500, 10);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![]);
        let id = t.force_send(20);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: true }]);
        t.lock_acquired(21);
        let mut sent_batches = 0;
        let mut flushed_with = None;
        for now in 22..40 {
            let (out, _) = run(&mut t, &mut st);
            if let Some(sent) = flushed(&out) {
                flushed_with = Some(sent);
                assert!(out.contains(&Output::Unlock));
                break;
            }
            let b = batch_of(&out).expect("the next batch");
            sent_batches += 1;
            t.response(b, 200, None, vec![], now);
        }
        assert_eq!(sent_batches, 2);
        assert_eq!(flushed_with, Some(1_500));
        assert_eq!(t.pending(), 0);
        let _ = id;
    }

    #[test]
    fn retry_after_holds_even_force_send_and_dates_are_read() {
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(50.0, 600_000.0), 1, 0);
        track(&mut t, &mut st, 1, 1_000);
        t.force_send(1_000);
        run(&mut t, &mut st);
        t.lock_acquired(1_000);
        let (out, _) = run(&mut t, &mut st);
        let b = batch_of(&out).unwrap();
        // An HTTP date 3 s ahead of "now" (1,000 ms after the epoch here).
        t.response(b, 429, Some("Thu, 01 Jan 1970 00:00:04 GMT"), vec![], 1_000);
        let (out, wake) = run(&mut t, &mut st);
        assert_eq!(flushed(&out), Some(0), "the failed send ends forceSend()");
        assert_eq!(t.status().next_retry_at, Some(4_000));
        assert!(wake.unwrap() >= 4_000);
        // A second forceSend() before then sends nothing.
        t.force_send(2_000);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: true }]);
        t.lock_acquired(2_000);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(batch_of(&out), None);
        assert_eq!(flushed(&out), Some(0));
        // Seconds work too.
        assert_eq!(retry_after_ms(" 7 ", 0, http_date), Some(7_000));
        assert_eq!(retry_after_ms("soon", 0, http_date), None);
    }

    #[test]
    fn a_busy_lock_means_look_again_in_a_second_and_offline_costs_no_attempt() {
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(1.0, 600_000.0), 1, 0);
        let (out, _) = track(&mut t, &mut st, 1, 100);
        assert_eq!(out, vec![Output::Lock { wait: false }]);
        t.lock_unavailable(100);
        let (out, wake) = run(&mut t, &mut st);
        assert_eq!(out, vec![]);
        assert_eq!(wake, Some(1_100));
        t.timeout(1_100);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: false }]);
        t.lock_acquired(1_100);
        let b = batch_of(&run(&mut t, &mut st).0).unwrap();
        // The request failed while the browser says it is offline.
        t.set_online(false, 1_200);
        t.response(b, 0, None, vec![], 1_200);
        let (_, wake) = run(&mut t, &mut st);
        assert_eq!(wake, None, "waits for the online event");
        assert_eq!(t.status().next_retry_at, None, "no attempt spent");
        assert_eq!(t.status().last_error.as_deref(), Some("offline"));
        t.set_online(true, 5_000);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: false }]);
    }

    #[test]
    fn the_next_page_asks_which_unload_batches_arrived_before_resending() {
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(100.0, 600_000.0), 1, 0);
        track(&mut t, &mut st, 200, 1_000);
        t.page_hide(1_010);
        let (out, wake) = run(&mut t, &mut st);
        assert!(matches!(
            &out[..],
            [Output::Transmit(Transmit {
                kind: TransmitKind::Beacon,
                ..
            })]
        ));
        assert_eq!(wake, None);
        assert!(st
            .keys()
            .any(|k| k.starts_with(crate::storage::UNCONFIRMED)));
        // The next page.
        let (mut next, _) = start(&mut st, settings(100.0, 600_000.0), 2, 1_300);
        let (out, wake) = run(&mut next, &mut st);
        assert_eq!(out, vec![], "nothing sent before the question");
        assert_eq!(wake, Some(2_010), "asks once the beacon is a second old");
        next.timeout(2_010);
        let (out, _) = run(&mut next, &mut st);
        let Output::Transmit(q) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(q.kind, TransmitKind::Confirm);
        assert_eq!(q.url, "https://c.example/v1/batch/status?key=k");
        let asked: serde_json::Value = serde_json::from_slice(&q.body).unwrap();
        let id = asked["batch_ids"][0].as_str().unwrap().to_string();
        next.confirmation(Some(vec![id]), 2_050);
        run(&mut next, &mut st);
        assert_eq!(next.pending(), 0, "the beacon arrived: nothing to resend");
        assert!(!st
            .keys()
            .any(|k| k.starts_with("tl1:e:") || k.starts_with("tl1:b:")));
    }

    #[test]
    fn a_network_error_is_a_lost_answer_asked_about_before_resending() {
        // A page that tracks and navigates away in the same task: its keepalive request
        // reaches the collector, but the page sees a network error as it goes.
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(100.0, 600_000.0), 1, 0);
        let (out, _) = track(&mut t, &mut st, 200, 1_000);
        assert_eq!(out, vec![Output::Lock { wait: false }]);
        t.lock_acquired(1_000);
        let b = batch_of(&run(&mut t, &mut st).0).expect("a batch");
        t.response(b, 0, None, vec![], 1_040);
        let (out, wake) = run(&mut t, &mut st);
        assert_eq!(batch_of(&out), None, "not sent again straight away");
        assert_eq!(t.pending(), 200, "nothing lost");
        assert_eq!(t.status().last_error.as_deref(), Some("network error"));
        assert_eq!(wake, Some(2_040), "asks once the request is a second old");
        assert!(st
            .keys()
            .any(|k| k.starts_with(crate::storage::UNCONFIRMED)));
        // The page goes: no beacon for events that may have arrived; the next page asks.
        t.page_hide(1_050);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(
            out,
            vec![],
            "no beacon: the events are unconfirmed, not unsent"
        );
        let (mut next, _) = start(&mut st, settings(100.0, 600_000.0), 2, 1_300);
        assert_eq!(run(&mut next, &mut st).1, Some(2_040));
        next.timeout(2_040);
        let (out, _) = run(&mut next, &mut st);
        let Output::Transmit(q) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(q.kind, TransmitKind::Confirm);
        let asked: serde_json::Value = serde_json::from_slice(&q.body).unwrap();
        let id = asked["batch_ids"][0].as_str().unwrap().to_string();
        next.confirmation(Some(vec![id]), 2_060);
        let (out, _) = run(&mut next, &mut st);
        assert_eq!(batch_of(&out), None);
        assert_eq!(next.pending(), 0, "it arrived: nothing sent twice");
        assert!(!st
            .keys()
            .any(|k| k.starts_with("tl1:e:") || k.starts_with("tl1:b:")));

        // A request that really failed: the question fails too, and the events are sent
        // again after the backoff.
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(100.0, 600_000.0), 1, 0);
        track(&mut t, &mut st, 100, 1_000);
        t.lock_acquired(1_000);
        let b = batch_of(&run(&mut t, &mut st).0).unwrap();
        t.response(b, 0, None, vec![], 1_040);
        run(&mut t, &mut st);
        t.timeout(2_040);
        let (out, _) = run(&mut t, &mut st);
        assert!(only_asks(&out), "{out:?}");
        t.confirmation(None, 2_050);
        let retry_at = t.status().next_retry_at.expect("the failure counts");
        let (mut out, wake) = run(&mut t, &mut st);
        let mut at = 2_050;
        if retry_at > 2_050 {
            assert_eq!(out, vec![], "waits for the backoff");
            at = wake.expect("a retry");
            assert_eq!(at, retry_at);
            t.timeout(at);
            out = run(&mut t, &mut st).0;
        }
        assert_eq!(out, vec![Output::Lock { wait: false }]);
        t.lock_acquired(at);
        let b = batch_of(&run(&mut t, &mut st).0).expect("the events again");
        t.response(b, 200, None, vec![], at + 10);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn without_an_answer_to_the_question_the_events_are_sent_again() {
        let mut st = Storage::new();
        let (mut t, _) = start(&mut st, settings(100.0, 600_000.0), 1, 0);
        track(&mut t, &mut st, 5, 1_000);
        t.page_hide(1_000);
        run(&mut t, &mut st);
        let (mut next, _) = start(&mut st, settings(100.0, 600_000.0), 2, 1_100);
        // forceSend() asks at once rather than waiting for the second to pass.
        next.force_send(1_100);
        let (out, _) = run(&mut next, &mut st);
        assert!(only_asks(&out), "{out:?}");
        next.confirmation(None, 1_150);
        let (out, _) = run(&mut next, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: true }]);
        next.lock_acquired(1_151);
        let (out, _) = run(&mut next, &mut st);
        let b = batch_of(&out).expect("the events again");
        next.response(b, 200, None, vec![], 1_200);
        let (out, _) = run(&mut next, &mut st);
        assert_eq!(flushed(&out), Some(5));
    }

    #[test]
    fn calls_kept_before_the_wasm_was_ready_come_back_in_order_and_leave_storage() {
        let mut st = Storage::new();
        st.insert("tl1:p:b.1000001".into(), "[\"track\",[\"B\"],2]".into());
        st.insert("tl1:p:a.1000000".into(), "[\"track\",[\"A\"],1]".into());
        let (mut t, early) = start(&mut st, settings(50.0, 5_000.0), 1, 0);
        let keys: Vec<&str> = early.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["tl1:p:a.1000000", "tl1:p:b.1000001"]);
        run(&mut t, &mut st);
        assert!(!st.keys().any(|k| k.starts_with("tl1:p:")));
    }

    #[test]
    fn a_privacy_signal_or_missing_settings_make_an_inert_tracker() {
        let mut st = Storage::new();
        let mut t = Tracker::new(settings(50.0, 5_000.0), 1, true, http_date);
        st.insert("tl1:p:a".into(), "[\"track\",[\"A\"],1]".into());
        let snap = st.clone();
        assert!(t.start(crate::memory::entries(&snap), true, 0).is_empty());
        assert!(t.is_inert());
        assert_eq!(t.track("x", None, 1), Err(Skipped::OptedOut));
        t.force_send(2);
        let (out, wake) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Flushed { id: 1, sent: 0 }]);
        assert_eq!(wake, None);
        assert!(st.is_empty(), "nothing kept, the early call removed");
        let t = Tracker::new(Options::default().settings(), 1, false, http_date);
        assert!(t.is_inert(), "no endpoint or key");
    }

    #[test]
    fn another_tabs_lease_release_sends_what_waited_for_it() {
        let mut st = Storage::new();
        st.insert("tl1:lease".into(), "other-tab 999999".into());
        let (mut t, _) = start(&mut st, settings(1.0, 600_000.0), 1, 0);
        let (out, wake) = track(&mut t, &mut st, 1, 10);
        assert_eq!(out, vec![]);
        assert_eq!(wake, Some(999_999), "after the other tab's lease");
        st.remove("tl1:lease");
        t.storage_changed(Some("tl1:lease"), None, 20);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(out, vec![Output::Lock { wait: false }]);
        t.lock_acquired(21);
        let (out, _) = run(&mut t, &mut st);
        assert_eq!(
            out,
            vec![Output::ReadStorage],
            "other tabs wrote: read first"
        );
        let snap = st.clone();
        t.refresh(crate::memory::entries(&snap), 22);
        assert!(batch_of(&run(&mut t, &mut st).0).is_some());
    }
}
