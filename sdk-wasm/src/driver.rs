//! The driver: carries out the core's [`Output`]s in the browser and feeds the page's
//! events, timers and answers back in. It makes no decisions: when to send, what to keep
//! and how long to wait are the core's.
//!
//! Every entry point borrows the state briefly and never while calling the page's code
//! (listeners, promise callbacks), so a listener that calls back into the tracker is fine.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use gloo_timers::callback::Timeout;
use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use tracklet_core::{Action, Autocapture, Options, Output, Tracker, Transmit, TransmitKind};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{spawn_local, JsFuture};
use web_sys::{Blob, BlobPropertyBag, RequestCredentials, RequestInit, Response, Storage};

use crate::page;

pub struct Driver {
    me: Weak<Driver>,
    /// Wraps a callback in a JavaScript `try`/`catch` (from the facade; see `Tracker::new`).
    guard: Function,
    state: RefCell<State>,
}

struct State {
    tracker: Tracker,
    store: Option<Storage>,
    debug: bool,
    /// The wake-up timer and the time it is set for.
    timer: Option<(u64, Timeout)>,
    /// `forceSend()` promises waiting: (flush id, resolve).
    flushes: Vec<(u32, Function)>,
    /// Resolves the promise that holds the Web Lock.
    unlock: Option<Function>,
    listeners: Vec<(u32, Function)>,
    next_listener: u32,
    status_queued: bool,
    /// The timer that tells the listeners (kept, not leaked: replaced by the next one).
    status_timer: Option<Timeout>,
    end_task_queued: bool,
    /// The microtask that ends a task (kept alive here), and its guarded function.
    end_task: Option<(Closure<dyn FnMut()>, JsValue)>,
}

impl Driver {
    pub fn start(options: &JsValue, early: &Array, guard: Function) -> Rc<Driver> {
        let settings = serde_wasm_bindgen::from_value::<Options>(options.clone())
            .unwrap_or_default()
            .settings();
        if !settings.usable() {
            page::warn("init() needs endpoint and apiKey", &JsValue::UNDEFINED);
        }
        let debug = settings.debug;
        let mut tracker = Tracker::new(
            settings,
            page::seed(),
            page::privacy_signal(),
            page::parse_http_date,
        );
        if tracker.is_inert() && debug {
            page::warn("tracking is off", &JsValue::UNDEFINED);
        }
        let store = page::storage();
        if store.is_none() && debug {
            page::warn("no localStorage: queueing in memory", &JsValue::UNDEFINED);
        }
        let snapshot = store.as_ref().map(page::snapshot).unwrap_or_default();
        let online = page::window().is_none_or(|w| w.navigator().on_line());
        let mut replay = tracker.start(page::pairs(&snapshot), online, page::now());
        // Calls kept only in memory (storage refused them), merged in by key (the keys
        // sort by time).
        for pair in early.iter() {
            let pair = Array::from(&pair);
            if let (Some(k), Some(v)) = (pair.get(0).as_string(), pair.get(1).as_string()) {
                let at = replay.partition_point(|(key, _)| *key < k);
                if replay.get(at).is_none_or(|(key, _)| *key != k) {
                    replay.insert(at, (k, v));
                }
            }
        }
        let inert = tracker.is_inert();
        let driver = Rc::new_cyclic(|me: &Weak<Driver>| {
            let weak = me.clone();
            let end_task = Closure::<dyn FnMut()>::new(move || {
                if let Some(d) = weak.upgrade() {
                    d.end_task();
                }
            });
            let end_task_fn = guarded(&guard, end_task.as_ref());
            Driver {
                me: me.clone(),
                guard,
                state: RefCell::new(State {
                    tracker,
                    store,
                    debug,
                    timer: None,
                    flushes: Vec::new(),
                    unlock: None,
                    listeners: Vec::new(),
                    next_listener: 1,
                    status_queued: false,
                    status_timer: None,
                    end_task_queued: false,
                    end_task: Some((end_task, end_task_fn)),
                }),
            }
        });
        driver.set_context();
        if !inert {
            driver.listen();
        }
        driver.drive();
        for (_, call) in replay {
            driver.replay(&call);
        }
        driver.drive();
        driver
    }

    /// What autocapture should record, if anything (`None` for an inert tracker).
    pub fn autocapture(&self) -> Option<Autocapture> {
        let s = self.state.borrow();
        (!s.tracker.is_inert()).then(|| s.tracker.settings().autocapture)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Tracker) -> R) -> R {
        f(&mut self.state.borrow_mut().tracker)
    }

    pub fn log(&self, message: &str) {
        if self.state.try_borrow().is_ok_and(|s| s.debug) {
            page::warn(message, &JsValue::UNDEFINED);
        }
    }

    /// A call kept before the wasm was ready: `[method, args, ts]` as JSON.
    fn replay(&self, call: &str) {
        let Ok(call) = js_sys::JSON::parse(call) else {
            return;
        };
        let call = Array::from(&call);
        let args = Array::from(&call.get(1));
        let at = call.get(2).as_f64().map(|t| t as u64);
        match call.get(0).as_string().as_deref() {
            Some("track") => self.track(&args.get(0), &args.get(1), at),
            Some("page") => self.page(&args.get(0), at),
            Some("identify") => self.identify(&args.get(0), &args.get(1), at),
            Some("reset") => self.reset(),
            Some("optOut") => self.opt_out(),
            Some("optIn") => self.opt_in(),
            _ => {}
        }
    }

    pub fn track(&self, name: &JsValue, props: &JsValue, at: Option<u64>) {
        match name.as_string().filter(|n| !n.is_empty()) {
            Some(name) => self.track_json(&name, page::props_json(props).as_deref(), at),
            None => self.log("track() needs a non-empty event name"),
        }
    }

    pub fn track_json(&self, name: &str, props: Option<&str>, at: Option<u64>) {
        let now = at.unwrap_or_else(page::now);
        if let Err(why) = self.with(|t| t.track(name, props, now)) {
            self.log(&["event ", name, " not queued: ", why.reason()].concat());
        }
        self.end_task_soon();
    }

    pub fn page(&self, props: &JsValue, at: Option<u64>) {
        self.set_context();
        self.track_json("page_view", page::props_json(props).as_deref(), at);
    }

    pub fn identify(&self, user_id: &JsValue, traits: &JsValue, at: Option<u64>) {
        let Some(id) = user_id.as_string().filter(|id| !id.is_empty()) else {
            return self.log("identify() needs a user id");
        };
        self.with(|t| t.identify(&id, page::now()));
        self.track_json("identify", page::props_json(traits).as_deref(), at);
        self.drive();
    }

    pub fn reset(&self) {
        self.with(|t| t.reset(page::now()));
        self.drive();
    }

    pub fn opt_out(&self) {
        self.with(|t| t.opt_out(page::now()));
        self.drive();
    }

    pub fn opt_in(&self) {
        self.with(|t| t.opt_in(page::now()));
        self.drive();
    }

    pub fn clear(&self) -> usize {
        let store = self.state.borrow().store.clone();
        let snapshot = match &store {
            Some(s) if self.with(|t| t.wants_storage()) => Some(page::snapshot(s)),
            _ => None,
        };
        let n = self.with(|t| t.clear(snapshot.as_deref().map(page::pairs), page::now()));
        self.drive();
        n
    }

    pub fn pending(&self) -> usize {
        self.state.borrow().tracker.pending()
    }

    pub fn status(&self) -> JsValue {
        let status = self.state.borrow().tracker.status();
        let ser = serde_wasm_bindgen::Serializer::new().serialize_missing_as_null(true);
        serde::Serialize::serialize(&status, &ser).unwrap_or(JsValue::NULL)
    }

    pub fn on_status(&self, listener: Function) -> JsValue {
        let id = {
            let mut s = self.state.borrow_mut();
            let id = s.next_listener;
            s.next_listener += 1;
            s.listeners.push((id, listener));
            s.tracker.watch_status();
            id
        };
        let me = self.me.clone();
        Closure::once_into_js(move || {
            if let Some(d) = me.upgrade() {
                d.state.borrow_mut().listeners.retain(|(i, _)| *i != id);
            }
        })
    }

    pub fn force_send(&self) -> Promise {
        let mut resolve = None;
        let promise = Promise::new(&mut |res, _| resolve = Some(res));
        let id = self.with(|t| t.force_send(page::now()));
        if let Some(res) = resolve {
            self.state.borrow_mut().flushes.push((id, res));
        }
        self.drive();
        promise
    }

    /// The events tracked in this task are written to storage in one write, in a
    /// microtask (before the task ends, so before any unload).
    fn end_task_soon(&self) {
        let mut s = self.state.borrow_mut();
        if s.end_task_queued {
            return;
        }
        s.end_task_queued = true;
        if let (Some(w), Some((_, f))) = (page::window(), &s.end_task) {
            w.queue_microtask(f.unchecked_ref());
        }
    }

    fn end_task(&self) {
        self.state.borrow_mut().end_task_queued = false;
        self.with(|t| t.end_task(page::now()));
        self.drive();
    }

    /// Carries out the core's outputs until it has nothing more to do.
    pub fn drive(&self) {
        loop {
            let Ok(mut s) = self.state.try_borrow_mut() else {
                return;
            };
            let output = s.tracker.poll_output();
            drop(s);
            match output {
                Output::Persist(action) => self.persist(action),
                Output::Transmit(t) => self.transmit(t),
                Output::Lock { wait } => self.lock(wait),
                Output::Unlock => {
                    let unlock = self.state.borrow_mut().unlock.take();
                    if let Some(f) = unlock {
                        let _ = f.call0(&JsValue::UNDEFINED);
                    }
                }
                Output::ReadStorage => {
                    let store = self.state.borrow().store.clone();
                    let snapshot = store.as_ref().map(page::snapshot).unwrap_or_default();
                    self.with(|t| t.refresh(page::pairs(&snapshot), page::now()));
                }
                Output::Flushed { id, sent } => self.flushed(id, sent),
                Output::StatusChanged => self.status_soon(),
                Output::Wake(at) => {
                    self.wake_at(at);
                    return;
                }
            }
        }
    }

    fn persist(&self, action: Action) {
        let Some(store) = self.state.borrow().store.clone() else {
            return;
        };
        match action {
            Action::Set(k, v) => {
                if store.set_item(&k, &v).is_err() {
                    self.log("storage write failed: event kept in memory");
                    self.with(|t| t.persist_failed(&k));
                }
            }
            Action::Remove(k) => {
                let _ = store.remove_item(&k);
            }
        }
    }

    fn transmit(&self, t: Transmit) {
        let Transmit { kind, url, body } = t;
        if kind == TransmitKind::Beacon {
            let sent = page::window()
                .zip(blob(&body))
                .map(|(w, b)| w.navigator().send_beacon_with_opt_blob(&url, Some(&b)));
            if !matches!(sent, Some(Ok(true))) {
                self.log("the unload beacon was refused");
            }
            return;
        }
        let me = self.me.clone();
        spawn_local(async move {
            let answer = post(&url, &body, kind != TransmitKind::Confirm).await;
            let Some(d) = me.upgrade() else { return };
            let now = page::now();
            match kind {
                TransmitKind::Batch(batch) => {
                    let (status, retry_after, rejected) = match answer {
                        Ok(a) => (a.status, a.retry_after, a.rejected),
                        Err(()) => {
                            // Whether this counts as being offline is the core's call.
                            let online = page::window().is_none_or(|w| w.navigator().on_line());
                            if !online {
                                d.with(|t| t.set_online(false, now));
                            }
                            (0, None, Vec::new())
                        }
                    };
                    if !(200..300).contains(&status) {
                        d.log("send failed: events stay queued");
                    }
                    d.with(|t| t.response(batch, status, retry_after.as_deref(), rejected, now));
                }
                _ => {
                    let arrived = answer.ok().and_then(|a| a.arrived);
                    d.with(|t| t.confirmation(arrived, now));
                }
            }
            d.drive();
        });
    }

    fn lock(&self, wait: bool) {
        let locks = page::window().and_then(|w| {
            let nav: JsValue = w.navigator().into();
            Reflect::get(&nav, &"locks".into())
                .ok()
                .filter(|l| !l.is_undefined())
                .map(|l| l.unchecked_into::<web_sys::LockManager>())
        });
        let Some(locks) = locks else {
            // No Web Locks: the core's storage lease alone keeps tabs apart.
            self.with(|t| t.lock_acquired(page::now()));
            return;
        };
        let options = web_sys::LockOptions::new();
        if wait {
            options.set_signal(&web_sys::AbortSignal::timeout_with_u32(30_000));
        } else {
            options.set_if_available(true);
        }
        let me = self.me.clone();
        let granted = Closure::once_into_js(move |lock: JsValue| -> Promise {
            let Some(d) = me.upgrade() else {
                return Promise::resolve(&JsValue::UNDEFINED);
            };
            if lock.is_null() {
                d.with(|t| t.lock_unavailable(page::now()));
                d.drive();
                return Promise::resolve(&JsValue::UNDEFINED);
            }
            // Held until the core says Unlock.
            let held = Promise::new(&mut |resolve, _| d.state.borrow_mut().unlock = Some(resolve));
            d.with(|t| t.lock_acquired(page::now()));
            d.drive();
            held
        });
        let granted = guarded(&self.guard, &granted);
        let request =
            locks.request_with_options("tracklet:send", &options, granted.unchecked_ref());
        let me = self.me.clone();
        spawn_local(async move {
            if JsFuture::from(request).await.is_err() {
                // The wait timed out (or the browser refused).
                if let Some(d) = me.upgrade() {
                    d.with(|t| t.lock_unavailable(page::now()));
                    d.drive();
                }
            }
        });
    }

    fn flushed(&self, id: u32, sent: u64) {
        let resolve = {
            let mut s = self.state.borrow_mut();
            let at = s.flushes.iter().position(|(i, _)| *i == id);
            at.map(|at| s.flushes.remove(at).1)
        };
        if let Some(resolve) = resolve {
            let result = Object::new();
            let _ = Reflect::set(&result, &"sent".into(), &JsValue::from_f64(sent as f64));
            let pending = self.pending() as f64;
            let _ = Reflect::set(&result, &"pending".into(), &JsValue::from_f64(pending));
            let _ = resolve.call1(&JsValue::UNDEFINED, &result);
        }
    }

    /// Tells the `onStatus()` listeners, once per task.
    fn status_soon(&self) {
        let mut s = self.state.borrow_mut();
        if s.status_queued || s.listeners.is_empty() {
            return;
        }
        s.status_queued = true;
        let me = self.me.clone();
        s.status_timer = Some(Timeout::new(0, move || {
            let Some(d) = me.upgrade() else { return };
            let listeners: Vec<Function> = {
                let mut s = d.state.borrow_mut();
                s.status_queued = false;
                s.listeners.iter().map(|(_, f)| f.clone()).collect()
            };
            let status = d.status();
            for f in listeners {
                // A listener that throws is logged; the others still hear.
                if let Err(e) = f.call1(&JsValue::UNDEFINED, &status) {
                    if d.state.borrow().debug {
                        page::warn("an onStatus listener threw", &e);
                    }
                }
            }
        }));
    }

    fn wake_at(&self, at: Option<u64>) {
        let mut s = self.state.borrow_mut();
        let Some(at) = at else {
            s.timer = None;
            return;
        };
        if s.timer.as_ref().is_some_and(|(t, _)| *t == at) {
            return;
        }
        let delay = at.saturating_sub(page::now()).min(i32::MAX as u64) as u32;
        let me = self.me.clone();
        let timeout = Timeout::new(delay, move || {
            if let Some(d) = me.upgrade() {
                d.state.borrow_mut().timer = None;
                d.with(|t| t.timeout(page::now()));
                d.drive();
            }
        });
        s.timer = Some((at, timeout));
    }

    /// The page's events the core hears about.
    fn listen(&self) {
        let Some(w) = page::window() else { return };
        self.on(&w, "online", |d, _| {
            d.with(|t| t.set_online(true, page::now()))
        });
        self.on(&w, "offline", |d, _| {
            d.with(|t| t.set_online(false, page::now()))
        });
        self.on(&w, "pagehide", |d, _| d.with(|t| t.page_hide(page::now())));
        self.on(&w, "pageshow", |d, _| d.with(|t| t.page_show(page::now())));
        self.on(&w, "storage", |d, e| {
            if let Some(e) = e.dyn_ref::<web_sys::StorageEvent>() {
                let (key, value) = (e.key(), e.new_value());
                d.with(|t| t.storage_changed(key.as_deref(), value.as_deref(), page::now()));
            }
        });
        if let Some(doc) = w.document() {
            self.on(&doc, "visibilitychange", |d, _| {
                let hidden = page::window()
                    .and_then(|w| w.document())
                    .is_some_and(|doc| doc.visibility_state() == web_sys::VisibilityState::Hidden);
                if hidden {
                    d.with(|t| t.page_hidden(page::now()));
                }
            });
        }
    }

    /// Listens (passively) for `event` on `target` for the page's life; `f`, then
    /// [`Driver::drive`].
    pub fn on(
        &self,
        target: &web_sys::EventTarget,
        event: &str,
        f: impl Fn(&Driver, web_sys::Event) + 'static,
    ) {
        self.listen_with(target, event, false, Box::new(f));
    }

    /// [`Driver::on`] in the capture phase.
    pub fn on_capture(
        &self,
        target: &web_sys::EventTarget,
        event: &str,
        f: impl Fn(&Driver, web_sys::Event) + 'static,
    ) {
        self.listen_with(target, event, true, Box::new(f));
    }

    /// (One closure type for every listener: a generic one here would be compiled once
    /// per event, about 4 KB of wasm.)
    fn listen_with(&self, target: &web_sys::EventTarget, event: &str, capture: bool, f: Listener) {
        let me = self.me.clone();
        let listener = Closure::<dyn Fn(web_sys::Event)>::new(move |e| {
            if let Some(d) = me.upgrade() {
                f(&d, e);
                d.drive();
            }
        });
        let options = web_sys::AddEventListenerOptions::new();
        options.set_passive(true);
        options.set_capture(capture);
        let _ = target.add_event_listener_with_callback_and_add_event_listener_options(
            event,
            guarded(&self.guard, listener.as_ref()).unchecked_ref(),
            &options,
        );
        listener.forget();
    }

    /// A handle for callbacks that must not keep the driver alive.
    pub fn handle(&self) -> Weak<Driver> {
        self.me.clone()
    }

    /// Fresh page context for the events that follow.
    pub fn set_context(&self) {
        self.with(|t| t.set_context(page::context_json()));
    }
}

/// `f` as the facade's guard returns it (or `f` itself if the guard failed).
fn guarded(guard: &Function, f: &JsValue) -> JsValue {
    guard
        .call1(&JsValue::UNDEFINED, f)
        .unwrap_or_else(|_| f.clone())
}

type Listener = Box<dyn Fn(&Driver, web_sys::Event)>;

/// What came back from a `fetch`.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    rejected: Vec<usize>,
    arrived: Option<Vec<String>>,
}

/// `answer[field]` as an array, if it is one.
fn array_field(answer: &JsValue, field: &str) -> Option<Array> {
    let v = Reflect::get(answer, &field.into()).ok()?;
    Array::is_array(&v).then(|| Array::from(&v))
}

fn blob(body: &[u8]) -> Option<Blob> {
    let parts = Array::of1(&Uint8Array::from(body));
    let bag = BlobPropertyBag::new();
    // text/plain: a "simple" request, so no CORS preflight.
    bag.set_type("text/plain");
    Blob::new_with_u8_array_sequence_and_options(&parts, &bag).ok()
}

/// POSTs `body` as text/plain; `keepalive` lets it finish if the page goes away.
async fn post(url: &str, body: &[u8], keepalive: bool) -> Result<Answer, ()> {
    let window = page::window().ok_or(())?;
    let init = RequestInit::new();
    init.set_method("POST");
    init.set_body(blob(body).ok_or(())?.as_ref());
    init.set_credentials(RequestCredentials::Omit);
    if keepalive {
        // Not in web-sys's RequestInit (its WebIDL predates the field).
        let _ = Reflect::set(&init, &"keepalive".into(), &JsValue::TRUE);
    }
    let resp: Response = JsFuture::from(window.fetch_with_str_and_init(url, &init))
        .await
        .map_err(|_| ())?
        .dyn_into()
        .map_err(|_| ())?;
    let status = resp.status();
    let retry_after = resp.headers().get("Retry-After").ok().flatten();
    // The parts of the collector's JSON answer the SDK reads (`docs/protocol.md`):
    // `rejected[].index` of a batch, `arrived[]` of a question.
    let mut body = JsValue::UNDEFINED;
    if resp.ok() {
        if let Ok(json) = resp.json() {
            body = JsFuture::from(json).await.unwrap_or(JsValue::UNDEFINED);
        }
    }
    let rejected = array_field(&body, "rejected").map_or(Vec::new(), |list| {
        list.iter()
            .filter_map(|r| Reflect::get(&r, &"index".into()).ok()?.as_f64())
            .map(|i| i as usize)
            .collect()
    });
    let arrived = array_field(&body, "arrived")
        .map(|list| list.iter().filter_map(|id| id.as_string()).collect());
    Ok(Answer {
        status,
        retry_after,
        rejected,
        arrived,
    })
}
