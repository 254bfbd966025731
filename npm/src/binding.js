// The browser side of the core: carries out its storage actions on localStorage, posts
// its batches with fetch (sendBeacon at unload), keeps its one timer and feeds it page
// events. No decisions here: when to send, what to keep and how long to wait are the
// wasm core's (sdk-core); this file only does the I/O it asks for.

const SEP = '\u0001';
// The operations of the wasm's `call` (sdk-wasm/src/lib.rs, `mod op`).
const RESTORE = 0;
const REFRESH = 1;
const TAKE_ACTIONS = 2;
const PERSIST_FAILED = 3;
const SET_CONTEXT = 4;
const IDENTIFY = 5;
const RESET = 6;
const OPT_OUT = 7;
const OPT_IN = 8;
const ADOPT_SESSION = 9;
const SET_ONLINE = 10;
const CLEAR = 11;
const PENDING = 12;
const STATUS = 13;
const NEXT_WAKE = 14;
const LEASE_HELD_ELSEWHERE = 15;
const ON_RESULT = 18;
const START = 19;
const PREFIX = 'tl1:';
const SESSION_KEY = 'tl1:sess';
const LEASE_KEY = 'tl1:lease';

/**
 * `guarded(log)(fn, fallback)` is `fn` made safe to hand to the page or the browser: what it
 * throws (even a trap in the wasm) and what a promise it returns rejects with go to `log`
 * (a no-op unless debug) and never reach the page's error handlers; a throw returns
 * `fallback`.
 */
export const guarded = (log) => (fn, fallback) =>
  function () {
    try {
      const r = fn.apply(this, arguments);
      return r && typeof r.catch === 'function' ? r.catch(log) : r;
    } catch (e) {
      log(e);
      return fallback;
    }
  };

/** localStorage, or null (or, with `probe`, null where a probe write fails too). */
export function storage(probe) {
  // Throws in sandboxed iframes and some private modes; a probe write catches the rest.
  try {
    const s = window.localStorage;
    if (probe) {
      s.setItem('tl1:probe', '1');
      s.removeItem('tl1:probe');
    }
    return s;
  } catch (e) {
    return null;
  }
}

// `Retry-After` in ms (delta-seconds or an HTTP date), or -1.
function retryAfterMs(resp) {
  const v = resp.headers.get('Retry-After');
  if (!v) return -1;
  if (/^\s*\d+\s*$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  return isNaN(at) ? -1 : Math.max(0, at - Date.now());
}

/**
 * Starts the wasm core (`engine`: its bindings, from wasm-loader.js) and binds it to this
 * page. `o` holds the normalised options; while `listeners` (a Set) has any,
 * `emit(statusJson)` is told about changes (coalesced to one call per task).
 */
export function bind(engine, o, emit, log, listeners) {
  const store = storage(true);
  if (!store) log('no localStorage: queueing in memory');
  const url = o.endpoint.replace(/\/+$/, '') + '/v1/batch?key=' + encodeURIComponent(o.apiKey);
  const call = (op, text = '', num = 0) => engine.call(op, text, num);
  call(
    START,
    // `<maxBatchSize> <maxWaitTime> <maxQueueSize>`, then the sampling rates as
    // `name<sep>rate in millionths<sep>...`, then alwaysKeep as `name<sep>...`, the three
    // parts joined by U+0002.
    [
      [o.maxBatchSize, o.maxWaitTime, o.maxQueueSize].map(Math.floor).join(' '),
      Object.keys(o.sampling)
        .flatMap((n) => [n, Math.round(Math.min(1, Math.max(0, Number(o.sampling[n]) || 0)) * 1e6)])
        .join(SEP),
      o.alwaysKeep.join(SEP),
    ].join('\u0002'),
    Math.random() * 9007199254740991,
  );
  const number = (op, num, text) => Number(call(op, text, num));
  // Every callback the browser calls goes through this: a failure (even a trap in the
  // wasm) is logged in debug mode and never reaches the page's error handlers.
  const guard = guarded(log);
  let timer = 0;
  let timerAt = -1;
  let statusQueued = false;

  // Carries out the core's storage actions; a failed write leaves the event in memory.
  function apply() {
    const a = call(TAKE_ACTIONS);
    if (!a || !store) return;
    const parts = a.split(SEP);
    for (let i = 0; i < parts.length - 1; ) {
      if (parts[i] === 'S') {
        try {
          store.setItem(parts[i + 1], parts[i + 2]);
        } catch (e) {
          log('storage write failed: event kept in memory');
          call(PERSIST_FAILED, parts[i + 1]);
        }
        i += 3;
      } else {
        try {
          store.removeItem(parts[i + 1]);
        } catch (e) {}
        i += 2;
      }
    }
  }

  function snapshot() {
    if (!store) return '';
    const out = [];
    try {
      for (let i = 0; i < store.length; i++) {
        const k = store.key(i);
        if (k && k.startsWith(PREFIX)) out.push(k, store.getItem(k));
      }
    } catch (e) {}
    return out.join(SEP);
  }

  // Other tabs' writes reach this one as `storage` events: re-read storage (O(queue)) only
  // after one came.
  let othersWrote = false;
  function refresh() {
    apply();
    if (store && othersWrote) {
      othersWrote = false;
      call(REFRESH, snapshot());
    }
  }

  // track() leaves its storage write to the end of the task: a microtask writes all the
  // events of the task as one record (a localStorage write costs 15-25 µs, whatever its
  // size). Microtasks run before the task ends, so before any unload.
  let flushQueued = false;
  function flushSoon() {
    if (flushQueued) return;
    flushQueued = true;
    queueMicrotask(
      guard(() => {
        flushQueued = false;
        apply();
        changed();
      }),
    );
  }

  function changed() {
    schedule();
    if (!statusQueued && listeners.size) {
      statusQueued = true;
      setTimeout(
        guard(() => {
          statusQueued = false;
          emit(call(STATUS));
        }),
        0,
      );
    }
  }

  // One timer, set to the core's next wake-up.
  function schedule() {
    const at = number(NEXT_WAKE);
    if (at === timerAt) return;
    clearTimeout(timer);
    timerAt = at;
    if (at >= 0) {
      timer = setTimeout(
        guard(() => {
          timerAt = -1;
          pump();
        }),
        Math.min(Math.max(0, at - Date.now()), 2147483647),
      );
    }
  }

  // POSTs the batch `engine.body()` returned last and reports its fate. Resolves to the
  // number of events the collector took (0 unless it was accepted).
  async function send(body) {
    let status = 0;
    let retryAfter = -1;
    let rejected = [];
    try {
      const resp = await fetch(url, {
        method: 'POST',
        body: new Blob([body], { type: 'text/plain' }),
        // Lets the request finish if the page goes away meanwhile.
        keepalive: true,
        credentials: 'omit',
      });
      status = resp.status;
      retryAfter = retryAfterMs(resp);
      if (resp.ok) {
        try {
          const r = (await resp.json()).rejected;
          if (Array.isArray(r)) rejected = r.map((x) => x.index >>> 0);
        } catch (e) {}
      }
    } catch (e) {
      status = navigator.onLine === false ? -1 : 0;
    }
    if (status < 200 || status > 299) log('send failed (' + status + '): events stay queued');
    const taken = number(ON_RESULT, Date.now(), [status, retryAfter, rejected.join(',')].join(' '));
    apply();
    changed();
    return taken;
  }

  // Runs `fn` holding the cross-tab send lock (Web Locks, where the browser has them), so
  // no two tabs send at once; a tab that dies releases it. The core's storage lease does
  // the same job, with an expiry, where Web Locks are missing. `wait`: queue for the lock
  // (bounded) instead of giving up when another tab holds it.
  const locks = navigator.locks;
  function withSendLock(wait, fn) {
    return (
      locks
        ? locks.request(
            'tracklet:send',
            wait ? (AbortSignal.timeout ? { signal: AbortSignal.timeout(30000) } : {}) : { ifAvailable: true },
            (lock) => (lock ? fn() : retrySoon()),
          )
        : Promise.resolve().then(fn)
    ).catch((e) => (log(e), 0));
  }

  // Another tab is sending: look again in a second.
  function retrySoon() {
    clearTimeout(timer);
    timerAt = -1;
    timer = setTimeout(guard(pump), 1000);
  }

  function pump() {
    withSendLock(false, async () => {
      refresh();
      const body = engine.body(Date.now(), false, false);
      apply();
      if (body) {
        changed(); // listeners see the batch in flight
        await send(body);
      } else schedule();
    });
  }

  let draining = null;
  // Sends batch after batch now (after the one in flight), skipping the backoff wait
  // but never a server's Retry-After. Resolves to the number of events acknowledged.
  function drain() {
    return withSendLock(true, async () => {
      let sent = 0;
      for (let i = 0; i < 600 && JSON.parse(call(STATUS)).inFlight > 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      for (let waits = 0; ; ) {
        refresh();
        const body = engine.body(Date.now(), true, false);
        apply();
        // Another tab's lease still shows: its last answer (and the removals before its
        // lease release) may not have reached this tab's storage yet. Wait for it rather
        // than resend what it sent.
        if (!body && number(LEASE_HELD_ELSEWHERE, Date.now()) >= 0 && waits++ < 150) {
          await new Promise((r) => setTimeout(r, 20));
          continue;
        }
        if (!body) break;
        changed();
        const n = await send(body);
        if (!n) break;
        sent += n;
      }
      schedule();
      return sent;
    });
  }

  // The page is going away: hand what is queued (as much as one request under 64 KB
  // holds) to sendBeacon, which outlives it. The events stay stored until a normal send
  // is acknowledged; the collector drops repeats.
  let unloading = false;
  function unload() {
    unloading = true;
    apply();
    const body = engine.body(Date.now(), false, true);
    if (body && navigator.sendBeacon) navigator.sendBeacon(url, new Blob([body], { type: 'text/plain' }));
    apply();
  }

  call(RESTORE, snapshot());
  call(SET_ONLINE, '', navigator.onLine !== false ? 1 : 0);
  apply();

  addEventListener(
    'online',
    guard(() => {
      call(SET_ONLINE, '', 1);
      pump();
    }),
  );
  addEventListener(
    'offline',
    guard(() => call(SET_ONLINE, '', 0)),
  );
  addEventListener('pagehide', guard(unload));
  // Back from the back-forward cache: the page lives again.
  addEventListener('pageshow', () => (unloading = false));
  addEventListener('storage', guard((e) => {
    if (e.key === null || e.key.startsWith(PREFIX)) othersWrote = true;
    if (e.key === SESSION_KEY && e.newValue) call(ADOPT_SESSION, e.newValue);
    // The sending tab let go: what waited for it may go now.
    if (e.key === LEASE_KEY && !e.newValue) pump();
  }));
  document.addEventListener('visibilitychange', guard(() => {
    // Send now, while the page can still hear the answer.
    // (Chromium fires it after pagehide when leaving: then the beacon has done the job.)
    if (document.visibilityState === 'hidden' && !unloading) draining = draining || drain().finally(() => (draining = null));
  }));
  // Anything left by earlier pages may be due at once.
  pump();

  const act = (f) =>
    function () {
      const r = f.apply(null, arguments);
      apply();
      changed();
      return r;
    };
  return {
    track: (name, props, at) => {
      engine.track((props || '') + SEP + name, isNaN(at) ? Date.now() : at);
      flushSoon();
    },
    setContext: (c) => call(SET_CONTEXT, c || ''),
    identify: act((id) => call(IDENTIFY, id)),
    reset: act(() => call(RESET, '', Date.now())),
    optOut: act(() => number(OPT_OUT)),
    optIn: act(() => call(OPT_IN)),
    clear: act(() => {
      refresh();
      return number(CLEAR);
    }),
    pending: () => number(PENDING),
    status: () => call(STATUS),
    forceSend: drain,
  };
}
