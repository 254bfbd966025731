//! Tracklet's wasm module: the sans-IO core, exported to JavaScript.
//!
//! Only strings, numbers and byte arrays cross the boundary. The browser side (storage,
//! `fetch`/`sendBeacon`, the timer, page events) is `npm/src/binding.js`: doing that I/O
//! through web-sys, js-sys, wasm-bindgen-futures and gloo-timers made the module 98.5 KB
//! (45.7 KB gzipped) against this shim's size, see the README's size section.
//!
//! Storage actions travel as one string: `S<sep>key<sep>value<sep>` for a write and
//! `R<sep>key<sep>` for a removal, `<sep>` being U+0001 (never in a key, and escaped in
//! every JSON value the core writes). Storage snapshots come in the same way, as
//! `key<sep>value<sep>...`.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use tracklet_core::{text, Action, Config, Core, Outcome};
use tracklet_wire::json::{push_str_literal, push_u64};
use wasm_bindgen::prelude::*;

#[cfg(any(target_arch = "wasm32", test))]
mod heap;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOC: heap::wasm::Global = heap::wasm::Global::new();

#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // The facade catches the resulting trap; no panic message machinery in the module.
    core::arch::wasm32::unreachable()
}

const SEP: char = '\u{1}';

fn parts(joined: &str) -> impl Iterator<Item = &str> + Clone {
    text::fields(joined, SEP as u8)
}

fn pairs(joined: &str) -> impl Iterator<Item = (&str, &str)> + Clone {
    let mut parts = parts(joined);
    core::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
}

/// The core of the page's tracker, driven by `binding.js`.
struct Engine {
    core: Core,
    /// The batch `body()` returned last, and how many events it holds.
    batch: u64,
    events: usize,
}

/// The page's one engine. The exports below are free functions over it rather than the
/// methods of an exported struct: wasm-bindgen's class glue (a JS class, a finalizer, an
/// `Rc<RefCell>` per call) cost about 1 KB gzipped. One engine per page is also what the
/// queue needs, as every tracker of an origin shares the same storage keys.
struct Global(core::cell::UnsafeCell<Option<Engine>>);
// SAFETY: wasm32 in the browser runs this module on one thread, and no export calls back
// into JavaScript, so no two `&mut Engine` are ever live at once.
unsafe impl Sync for Global {}
static ENGINE: Global = Global(core::cell::UnsafeCell::new(None));

fn engine() -> Option<&'static mut Engine> {
    // SAFETY: see `Global`.
    unsafe { (*ENGINE.0.get()).as_mut() }
}

/// The operations of [`call`]; `npm/src/binding.js` has the same numbers.
mod op {
    pub const RESTORE: u32 = 0;
    pub const REFRESH: u32 = 1;
    pub const TAKE_ACTIONS: u32 = 2;
    pub const PERSIST_FAILED: u32 = 3;
    pub const SET_CONTEXT: u32 = 4;
    pub const IDENTIFY: u32 = 5;
    pub const RESET: u32 = 6;
    pub const OPT_OUT: u32 = 7;
    pub const OPT_IN: u32 = 8;
    pub const ADOPT_SESSION: u32 = 9;
    pub const SET_ONLINE: u32 = 10;
    pub const CLEAR: u32 = 11;
    pub const PENDING: u32 = 12;
    pub const STATUS: u32 = 13;
    pub const NEXT_WAKE: u32 = 14;
    pub const LEASE_HELD_ELSEWHERE: u32 = 15;
    pub const ON_RESULT: u32 = 18;
    pub const START: u32 = 19;
}

/// Starts the page's engine (again: a new one replaces the old). `options` is
/// `<max batch size> <max wait ms> <max queue size>`, then `<sep2>` and the sampling rates
/// as `name<sep>rate in millionths<sep>...`, then `<sep2>` and the `alwaysKeep` names as
/// `name<sep>...` (`<sep2>` being U+0002): one string keeps the generated glue small.
fn start(options: &str, seed: u64) {
    let mut sections = text::fields(options, 2);
    let mut section = || sections.next().unwrap_or_default();
    let mut numbers = text::fields(section(), b' ');
    let mut number = |default| {
        numbers
            .next()
            .and_then(text::number)
            .map_or(default, |n| n as usize)
    };
    let mut cfg = Config {
        max_batch_size: number(50).max(1),
        max_wait_ms: number(5_000) as u64,
        max_queue_events: number(1_000).max(1),
        ..Config::default()
    };
    for (name, rate) in pairs(section()) {
        // Rates come in millionths: no float parser in the module.
        let rate = text::number(rate).map_or(1.0, |m| m as f64 / 1e6);
        cfg.sampling.push((name.into(), rate));
    }
    for name in parts(section()).filter(|n| !n.is_empty()) {
        cfg.always_keep.push(name.into());
    }
    // SAFETY: see `Global`; no reference from `engine()` is live here.
    unsafe {
        *ENGINE.0.get() = Some(Engine {
            core: Core::new(cfg, seed),
            batch: 0,
            events: 0,
        })
    };
}

/// Queues an event; returns false when it was not (opted out, sampled, invalid, or no
/// engine). `event` is the properties (a JSON object, or empty for none), U+0001, then the
/// name: one string crosses the boundary, and `JSON.stringify` never writes U+0001 raw.
/// The hot path, so it has an export of its own.
#[wasm_bindgen]
pub fn track(event: &str, now: f64) -> bool {
    let (props, name) = text::split_once(event, SEP as u8).unwrap_or(("", event));
    let props = (!props.is_empty()).then_some(props);
    engine().is_some_and(|e| e.core.track(name, props, now as u64).is_ok())
}

/// Every other call, by number (`OP` in `npm/src/binding.js`): one export instead of
/// eighteen keeps the module and its generated glue about 2 KB smaller. `text` and `num`
/// are the arguments; the answer is text (numbers in decimal, -1 for none).
#[wasm_bindgen]
pub fn call(op: u32, text: &str, num: f64) -> String {
    if op == op::START {
        start(text, num as u64);
    }
    match engine() {
        Some(e) => e.call(op, text, num),
        None => String::new(),
    }
}

/// Bytes out: the next batch if one is due (`force`: skipping the backoff wait), whose
/// fate `call(ON_RESULT)` reports; or, with `unload`, the body for `sendBeacon` as the page
/// goes away (see `Core::unload_body`).
#[wasm_bindgen]
pub fn body(now: f64, force: bool, unload: bool) -> Option<Vec<u8>> {
    let e = engine()?;
    if unload {
        return e.core.unload_body(now as u64);
    }
    let out = e.core.poll_send(now as u64, force)?;
    e.batch = out.batch;
    e.events = out.events;
    Some(out.body)
}

impl Engine {
    fn call(&mut self, op: u32, text: &str, num: f64) -> String {
        let now = num as u64;
        let mut out = String::new();
        let count = |out: &mut String, n: usize| push_u64(out, n as u64);
        let time = |out: &mut String, t: Option<u64>| match t {
            Some(t) => push_u64(out, t),
            None => out.push_str("-1"),
        };
        match op {
            op::RESTORE => self.core.restore(pairs(text)),
            op::REFRESH => self.core.refresh(pairs(text)),
            op::TAKE_ACTIONS => out = self.take_actions(),
            op::PERSIST_FAILED => self.core.persist_failed(text),
            op::SET_CONTEXT => self
                .core
                .set_context((!text.is_empty()).then(|| text.into())),
            op::IDENTIFY => self.core.identify(text),
            op::RESET => self.core.reset(now),
            op::OPT_OUT => count(&mut out, self.core.opt_out()),
            op::OPT_IN => self.core.opt_in(),
            op::ADOPT_SESSION => self.core.adopt_session(text),
            op::SET_ONLINE => self.core.set_online(num != 0.0),
            op::CLEAR => count(&mut out, self.core.clear()),
            op::PENDING => count(&mut out, self.core.pending()),
            op::STATUS => out = self.status(),
            op::NEXT_WAKE => time(&mut out, self.core.next_wake()),
            op::LEASE_HELD_ELSEWHERE => time(&mut out, self.core.lease_held_elsewhere(now)),
            op::ON_RESULT => count(&mut out, self.on_result(text, now)),
            _ => {}
        }
        out
    }

    /// What became of the batch `body()` returned last: `text` is `<status> <retry-after
    /// ms> <rejected>`, the status being the HTTP status, 0 for a network error and -1 for
    /// a network error while offline, the retry-after -1 for none, and the rejected
    /// indices (of a 2xx) joined by commas. Returns how many events the collector took
    /// (the batch's, for a 2xx; else none).
    fn on_result(&mut self, text: &str, now: u64) -> usize {
        let mut f = text::fields(text, b' ');
        let mut signed = || match f.next() {
            Some(n) if n.as_bytes().first() == Some(&b'-') => -1,
            n => n.and_then(text::number).map_or(-1, |n| n as i64),
        };
        let (status, retry_after) = (signed(), signed());
        let rejected = f.next().unwrap_or_default();
        let mut taken = 0;
        let outcome = match status {
            -1 => Outcome::Offline,
            200..=299 => {
                taken = self.events;
                let mut indices = Vec::new();
                for i in text::fields(rejected, b',') {
                    if let Some(i) = text::number(i) {
                        indices.push(i as usize);
                    }
                }
                Outcome::Accepted { rejected: indices }
            }
            400 => Outcome::BadRequest,
            401 | 403 => Outcome::Unauthorized {
                status: status as u16,
            },
            413 => Outcome::TooLarge,
            // Network errors, 408, 429, 5xx and anything unexpected: keep and back off.
            _ => Outcome::Retry {
                status: status.clamp(0, 999) as u16,
                retry_after_ms: (retry_after >= 0).then_some(retry_after as u64),
            },
        };
        self.core.on_result(self.batch, outcome, now);
        taken
    }

    /// Storage actions to carry out, in order (see the module docs for the format).
    fn take_actions(&mut self) -> String {
        let mut out = String::new();
        for a in self.core.take_actions() {
            match a {
                Action::Set(k, v) => {
                    out.push('S');
                    out.push(SEP);
                    out.push_str(&k);
                    out.push(SEP);
                    out.push_str(&v);
                }
                Action::Remove(k) => {
                    out.push('R');
                    out.push(SEP);
                    out.push_str(&k);
                }
            }
            out.push(SEP);
        }
        out
    }

    /// `status()` as JSON: counts are events, times ms since the epoch or null.
    fn status(&self) -> String {
        let s = self.core.status();
        fn num(out: &mut String, key: &str, n: Option<u64>) {
            out.push_str(key);
            match n {
                Some(n) => push_u64(out, n),
                None => out.push_str("null"),
            }
        }
        let mut out = String::with_capacity(160);
        num(&mut out, "{\"pending\":", Some(s.pending as u64));
        num(&mut out, ",\"inFlight\":", Some(s.in_flight as u64));
        out.push_str(",\"lastError\":");
        match &s.last_error {
            Some(e) => push_str_literal(&mut out, e),
            None => out.push_str("null"),
        }
        num(&mut out, ",\"lastSentAt\":", s.last_sent_at);
        num(&mut out, ",\"nextRetryAt\":", s.next_retry_at);
        out.push_str(if s.online {
            ",\"online\":true"
        } else {
            ",\"online\":false"
        });
        num(&mut out, ",\"rejected\":", Some(s.rejected));
        num(&mut out, ",\"dropped\":", Some(s.dropped));
        out.push_str(if s.opted_out {
            ",\"optedOut\":true}"
        } else {
            ",\"optedOut\":false}"
        });
        out
    }
}
