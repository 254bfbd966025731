//! Tracklet's browser driver: the sans-IO core ([`tracklet_core::Tracker`]) carried out in
//! the page.
//!
//! The core decides; this crate does the I/O it asks for, with web-sys (localStorage,
//! `fetch`, `sendBeacon`, Web Locks, page events), js-sys (time, `JSON.stringify`,
//! Promises, reflection on privacy signals) and gloo-timers (the one wake-up timer), and
//! feeds the page's events back in. JavaScript sees one class, [`Tracker`], whose
//! TypeScript declarations wasm-bindgen generates; `npm/src/facade.js` wraps it in the
//! synchronous `init()` that keeps calls made before the wasm is ready.
//!
//! - `driver.rs`: the loop that turns the core's outputs into browser calls.
//! - `page.rs`: what is read from the page (context, privacy signals, storage).
//! - `autocapture.rs`: page views, clicks and scroll depth.

mod autocapture;
mod driver;
mod page;

use js_sys::{Array, Promise};
use wasm_bindgen::prelude::*;

use driver::Driver;

/// The page's tracker. Made by `init()` in the JavaScript entry, once per page (every
/// tracker of an origin shares one stored queue). No method throws: bad arguments are
/// ignored (logged with `debug: true`).
#[wasm_bindgen]
pub struct Tracker(std::rc::Rc<Driver>);

#[wasm_bindgen]
impl Tracker {
    /// Starts a tracker with the `init()` options. `early` lists the calls made before
    /// the wasm was ready that could not be kept in localStorage, as `[key, json]` pairs
    /// (the others are read from storage); all are replayed in order.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue, early: Array) -> Tracker {
        Tracker(Driver::start(&options, &early))
    }

    /// Queues an event: `name` a non-empty string (at most 200 characters), `props` any
    /// JSON-serialisable object. It is in localStorage before the current task ends.
    pub fn track(&self, name: JsValue, props: JsValue) {
        self.0.track(&name, &props, None);
    }

    /// A `page_view` event with fresh page context.
    pub fn page(&self, props: JsValue) {
        self.0.page(&props, None);
    }

    /// Sets the user id on later events and tracks an `identify` event with `traits`.
    pub fn identify(&self, user_id: JsValue, traits: JsValue) {
        self.0.identify(&user_id, &traits, None);
    }

    /// New anonymous id and session, no user id (for logout).
    pub fn reset(&self) {
        self.0.reset();
    }

    /// Stops tracking (remembered) and discards the queue.
    #[wasm_bindgen(js_name = optOut)]
    pub fn opt_out(&self) {
        self.0.opt_out();
    }

    #[wasm_bindgen(js_name = optIn)]
    pub fn opt_in(&self) {
        self.0.opt_in();
    }

    /// Sends everything now, skipping the backoff wait but never a server's
    /// `Retry-After`. Resolves to `{sent, pending}`.
    #[wasm_bindgen(js_name = forceSend, unchecked_return_type = "Promise<ForceSendResult>")]
    pub fn force_send(&self) -> Promise {
        self.0.force_send()
    }

    /// Discards the queued events; returns how many were removed.
    #[wasm_bindgen(js_name = clearEvents)]
    pub fn clear_events(&self) -> u32 {
        self.0.clear() as u32
    }

    /// Events not yet acknowledged, in flight included.
    #[wasm_bindgen(js_name = pendingCount)]
    pub fn pending_count(&self) -> u32 {
        self.0.pending() as u32
    }

    /// What is queued, in flight, the last error and the next retry.
    #[wasm_bindgen(unchecked_return_type = "TrackerStatus")]
    pub fn status(&self) -> JsValue {
        self.0.status()
    }

    /// Calls `listener(status)` after changes, at most once per task. Returns a function
    /// that unsubscribes it.
    #[wasm_bindgen(js_name = onStatus, unchecked_return_type = "() => void")]
    pub fn on_status(&self, listener: js_sys::Function) -> JsValue {
        self.0.on_status(listener)
    }
}
