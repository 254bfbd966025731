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
use tracklet_core::{Action, Config, Core, Outcome};
use tracklet_wire::json::{push_str_literal, push_u64};
use wasm_bindgen::prelude::*;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
// SAFETY: wasm32 in the browser runs this module on one thread.
static ALLOC: talc::TalckWasm = unsafe { talc::TalckWasm::new_global() };

#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // The facade catches the resulting trap; no panic message machinery in the module.
    core::arch::wasm32::unreachable()
}

const SEP: char = '\u{1}';

fn pairs(joined: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut parts = joined.split(SEP);
    core::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
}

/// The core of one tracker, driven by `binding.js`.
#[wasm_bindgen]
pub struct Engine {
    core: Core,
    batch: f64,
    events: u32,
    unload: Vec<Vec<u8>>,
}

#[wasm_bindgen]
impl Engine {
    #[wasm_bindgen(constructor)]
    /// `sampling` is `name<sep>rate in millionths<sep>...`, `always_keep` is `name<sep>...` (strings
    /// rather than arrays keep the generated glue small).
    pub fn new(
        max_batch_size: u32,
        max_wait_ms: f64,
        max_queue_size: u32,
        sampling: &str,
        always_keep: &str,
        seed: f64,
    ) -> Engine {
        let cfg = Config {
            max_batch_size: max_batch_size.max(1) as usize,
            max_wait_ms: max_wait_ms as u64,
            max_queue_events: max_queue_size.max(1) as usize,
            // Rates come in millionths: no float parser in the module.
            sampling: pairs(sampling)
                .map(|(n, r)| (n.into(), r.parse::<u32>().map_or(1.0, |m| m as f64 / 1e6)))
                .collect(),
            always_keep: always_keep
                .split(SEP)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect(),
            ..Config::default()
        };
        Engine {
            core: Core::new(cfg, seed as u64),
            batch: 0.0,
            events: 0,
            unload: Vec::new(),
        }
    }

    /// Loads the stored `tl1:` entries (`key<sep>value<sep>...`).
    pub fn restore(&mut self, entries: &str, now: f64) {
        self.core.restore(pairs(entries), now as u64);
    }

    /// Re-reads the stored entries written by other tabs.
    pub fn refresh(&mut self, entries: &str) {
        self.core.refresh(pairs(entries));
    }

    /// Storage actions to carry out, in order (see the module docs for the format).
    #[wasm_bindgen(js_name = takeActions)]
    pub fn take_actions(&mut self) -> String {
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

    #[wasm_bindgen(js_name = persistFailed)]
    pub fn persist_failed(&mut self, key: &str) {
        self.core.persist_failed(key);
    }

    /// Queues an event; returns false when it was not (opted out, sampled, invalid).
    pub fn track(&mut self, name: &str, props: Option<String>, now: f64) -> bool {
        self.core.track(name, props.as_deref(), now as u64).is_ok()
    }

    #[wasm_bindgen(js_name = setContext)]
    pub fn set_context(&mut self, context: Option<String>) {
        self.core.set_context(context);
    }

    pub fn identify(&mut self, user_id: &str) {
        self.core.identify(user_id);
    }

    pub fn reset(&mut self, now: f64) {
        self.core.reset(now as u64);
    }

    #[wasm_bindgen(js_name = optOut)]
    pub fn opt_out(&mut self) -> u32 {
        self.core.opt_out() as u32
    }

    #[wasm_bindgen(js_name = optIn)]
    pub fn opt_in(&mut self) {
        self.core.opt_in();
    }

    #[wasm_bindgen(js_name = adoptSession)]
    pub fn adopt_session(&mut self, value: &str) {
        self.core.adopt_session(value);
    }

    #[wasm_bindgen(js_name = setOnline)]
    pub fn set_online(&mut self, online: bool) {
        self.core.set_online(online);
    }

    pub fn clear(&mut self) -> u32 {
        self.core.clear() as u32
    }

    pub fn pending(&self) -> u32 {
        self.core.pending() as u32
    }

    /// The next batch's gzip body if one is due; then `batch` and `events` describe it.
    #[wasm_bindgen(js_name = pollSend)]
    pub fn poll_send(&mut self, now: f64, force: bool) -> Option<Vec<u8>> {
        let out = self.core.poll_send(now as u64, force)?;
        self.batch = out.batch as f64;
        self.events = out.events as u32;
        Some(out.body)
    }

    #[wasm_bindgen(getter)]
    pub fn batch(&self) -> f64 {
        self.batch
    }

    #[wasm_bindgen(getter)]
    pub fn events(&self) -> u32 {
        self.events
    }

    /// What became of `batch`: `status` is the HTTP status, 0 for a network error and -1
    /// for a network error while offline; `rejected` the indices a 2xx listed, joined by
    /// commas.
    #[wasm_bindgen(js_name = onResult)]
    pub fn on_result(
        &mut self,
        batch: f64,
        status: i32,
        retry_after_ms: f64,
        rejected: &str,
        now: f64,
    ) {
        let outcome = match status {
            -1 => Outcome::Offline,
            200..=299 => Outcome::Accepted {
                rejected: rejected.split(',').filter_map(|i| i.parse().ok()).collect(),
            },
            400 => Outcome::BadRequest,
            401 | 403 => Outcome::Unauthorized {
                status: status as u16,
            },
            413 => Outcome::TooLarge,
            // Network errors, 408, 429, 5xx and anything unexpected: keep and back off.
            _ => Outcome::Retry {
                status: status.max(0) as u16,
                retry_after_ms: (retry_after_ms >= 0.0).then_some(retry_after_ms as u64),
            },
        };
        self.core.on_result(batch as u64, outcome, now as u64);
    }

    /// Prepares the bodies for `sendBeacon` at unload; take them with `unloadNext`.
    #[wasm_bindgen(js_name = prepareUnload)]
    pub fn prepare_unload(&mut self, now: f64) -> u32 {
        self.unload = self.core.unload_batches(now as u64);
        self.unload.reverse();
        self.unload.len() as u32
    }

    #[wasm_bindgen(js_name = unloadNext)]
    pub fn unload_next(&mut self) -> Option<Vec<u8>> {
        self.unload.pop()
    }

    /// Until when (ms) another tab holds the sending lease, or -1.
    #[wasm_bindgen(js_name = leaseHeldElsewhere)]
    pub fn lease_held_elsewhere(&self, now: f64) -> f64 {
        self.core
            .lease_held_elsewhere(now as u64)
            .map_or(-1.0, |t| t as f64)
    }

    /// When to call `pollSend` next (ms since the epoch), or -1 for "on the next event".
    #[wasm_bindgen(js_name = nextWake)]
    pub fn next_wake(&self) -> f64 {
        self.core.next_wake().map_or(-1.0, |t| t as f64)
    }

    /// `status()` as JSON: counts are events, times ms since the epoch or null.
    pub fn status(&self) -> String {
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
