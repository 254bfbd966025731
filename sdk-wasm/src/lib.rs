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

#[cfg(target_arch = "wasm32")]
#[global_allocator]
// SAFETY: the module runs on one thread (the page's), as TalckWasm requires.
static ALLOC: talc::TalckWasm = unsafe { talc::TalckWasm::new_global() };

// The types the class's methods take and give, for wasm-bindgen's generated declarations
// (npm/build.mjs turns them into npm/types/tracker.d.ts). The options' defaults and the
// status fields are defined in tracklet-core (`options.rs`, `Status`).
#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** What autocapture records. `true` (the default) is all three; `false` is none. */
export interface AutocaptureOptions {
  /** `page_view` on load, SPA navigation (once per path) and back-forward-cache restore. Default true. */
  pageView?: boolean;
  /** `click` with tag, id, classes, short text, href and a CSS path (never form values). Default true. */
  click?: boolean;
  /** `scroll` at 25/50/75/100 % depth, each once per page view. Default true. */
  scroll?: boolean;
}

export interface TrackletOptions {
  /** The collector's base URL; batches go to `endpoint + "/v1/batch"`. Required. */
  endpoint: string;
  /** The project's write key. Required. */
  apiKey: string;
  /** Send when this many events are queued; a larger backlog goes in bigger requests (up to
   * 1,000 events and 60 KB). Default 50. */
  maxBatchSize?: number;
  /** ... or when the oldest queued event is this many ms old. Default 5000. */
  maxWaitTime?: number;
  /** Most events kept; when full the oldest are dropped (and reported). Default 1000. */
  maxQueueSize?: number;
  /** Default true. */
  autocapture?: boolean | AutocaptureOptions;
  /** `{eventName: rate}` with rate from 0 to 1, for noisy events. Default `{}`. */
  sampling?: Record<string, number>;
  /** Event names never sampled out or dropped for space. Default `[]`. */
  alwaysKeep?: string[];
  /** Do Not Track and Global Privacy Control turn tracking off. Default true. */
  respectPrivacySignals?: boolean;
  /** Log what goes wrong to the console. Default false. */
  debug?: boolean;
}

/** Any JSON-serialisable object. */
export type Properties = Record<string, unknown>;

export interface TrackerStatus {
  /** Events not yet acknowledged, in flight included. */
  pending: number;
  /** Events in the request being sent now. */
  inFlight: number;
  /** The last send error, or null after a success. */
  lastError: string | null;
  /** When a batch was last acknowledged (ms since the epoch), or null. */
  lastSentAt: number | null;
  /** When the next retry is due (ms since the epoch), or null. */
  nextRetryAt: number | null;
  online: boolean;
  /** Events the collector rejected. */
  rejected: number;
  /** Events dropped because the queue was full. */
  dropped: number;
  optedOut: boolean;
}

export interface ForceSendResult {
  /** Events acknowledged by this send. */
  sent: number;
  /** Events still pending afterwards. */
  pending: number;
}
"#;

/// The page's tracker. Made by `init()` in the JavaScript entry, once per page (every
/// tracker of an origin shares one stored queue). No method throws: bad arguments are
/// ignored (logged with `debug: true`).
#[wasm_bindgen]
pub struct Tracker(std::rc::Rc<Driver>);

#[wasm_bindgen]
impl Tracker {
    /// Starts a tracker with the `init()` options. `early` lists the calls made before
    /// the wasm was ready that could not be kept in localStorage, as `[key, json]` pairs
    /// (the others are read from storage); all are replayed in order. `guard(f)` returns
    /// `f` wrapped in a `try`/`catch`: the driver hands the browser only guarded callbacks,
    /// so that a trap in the wasm (a JavaScript exception, which Rust cannot catch) never
    /// reaches the page's error handlers.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "TrackletOptions")] options: JsValue,
        #[wasm_bindgen(unchecked_param_type = "[string, string][]")] early: Array,
        #[wasm_bindgen(unchecked_param_type = "(f: Function) => Function")] guard: js_sys::Function,
    ) -> Tracker {
        let driver = Driver::start(&options, &early, guard);
        if let Some(on) = driver.autocapture() {
            autocapture::install(&driver, on);
            driver.drive();
        }
        Tracker(driver)
    }

    /// Queues an event: `name` a non-empty string (at most 200 characters), `props` any
    /// JSON-serialisable object. It is in localStorage before the current task ends.
    pub fn track(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "Properties")] props: Option<JsValue>,
    ) {
        self.0.track(&name, &props.unwrap_or_default(), None);
    }

    /// A `page_view` event with fresh page context.
    pub fn page(
        &self,
        #[wasm_bindgen(unchecked_optional_param_type = "Properties")] props: Option<JsValue>,
    ) {
        self.0.page(&props.unwrap_or_default(), None);
    }

    /// Sets the user id on later events and tracks an `identify` event with `traits`.
    pub fn identify(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] user_id: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "Properties")] traits: Option<JsValue>,
    ) {
        self.0.identify(&user_id, &traits.unwrap_or_default(), None);
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
    pub fn on_status(
        &self,
        #[wasm_bindgen(unchecked_param_type = "(status: TrackerStatus) => void")]
        listener: js_sys::Function,
    ) -> JsValue {
        self.0.on_status(listener)
    }
}
