// The JavaScript face of Tracklet: a synchronous init() around the wasm `Tracker` class
// (sdk-wasm, where every decision is made). What is left here is what must run before
// the wasm is loaded, or cannot run in it:
//
// - init() returns a tracker at once; calls made before the wasm is ready are kept in
//   localStorage (`tl1:p:<time>.<seq>`, replayed in order by the wasm, also by a later page
//   if this one closes first), or in memory where storage refuses them.
// - The options object is copied once, here: a getter that throws must make init() give
//   an inert tracker, not throw into the page.
// - A browser privacy signal (Do Not Track, Global Privacy Control) stops even those early
//   calls from being written to storage; the wasm applies the same rule once loaded.
// - Every method is wrapped so nothing throws into the page (a trap in the wasm included).
//
// Importing this module touches no browser global, so server-side rendering works.

import { IDLE_STATUS } from './idle-status.js';

export const VERSION = '0.1.0';
const PRE = 'tl1:p:';
// The calls kept until the wasm is ready, and how many arguments each keeps.
export const METHODS = ['track', 'page', 'identify', 'reset', 'optOut', 'optIn'];
const ARITY = [2, 1, 2, 0, 0, 0];

const noop = () => {};
// Wraps the callbacks the wasm hands the browser (page events, its microtask, the Web Lock
// callback): a trap in the wasm is a JavaScript exception that Rust cannot catch, and it
// must not reach the page's error handlers.
const guard = (f) =>
  function () {
    try {
      return f.apply(this, arguments);
    } catch (e) {}
  };
const warn = (...a) => console.warn('[tracklet]', ...a);
const safe = (fn, fallback) =>
  function () {
    try {
      return fn.apply(this, arguments);
    } catch (e) {
      return fallback;
    }
  };

function storage() {
  try {
    return window.localStorage;
  } catch (e) {
    return null;
  }
}

/**
 * Makes `init(options)`. `load` resolves to the wasm-bindgen bindings (wasm-loader.js).
 */
export function makeInit(load) {
  // The page's tracker and its options: one per page, since every tracker of an origin
  // shares one stored queue (and would capture every page view twice).
  let active = null;
  return function init(userOptions) {
    let o;
    try {
      o = Object.assign({}, userOptions);
    } catch (e) {
      warn('init() could not read its options', e);
      o = {};
    }
    const browser = typeof window !== 'undefined' && typeof document !== 'undefined';
    const signal =
      browser &&
      o.respectPrivacySignals !== false &&
      (navigator.doNotTrack === '1' || window.doNotTrack === '1' || navigator.globalPrivacyControl === true);
    const inert = !browser || signal || !o.endpoint || !o.apiKey;
    if (!inert && active) {
      if (active.o.endpoint !== o.endpoint || active.o.apiKey !== o.apiKey) {
        warn('init() again: the first tracker stays in use');
      }
      return active.tracker;
    }
    const t = start(o, inert, load);
    if (!inert) active = { tracker: t, o };
    return t;
  };
}

function start(o, inert, load) {
  let real = null;
  // Calls made before the wasm is ready: [key, json]; `kept` also in storage.
  const early = [];
  let seq = 0;

  function call(method, args) {
    if (inert) return;
    if (real) return real[method](...args);
    const key = PRE + Date.now().toString(36) + '.' + (1e6 + seq++) + Math.random().toString(36).slice(2, 6);
    let json;
    try {
      json = JSON.stringify([method, args, Date.now()]);
    } catch (e) {
      // Props that cannot be serialised (cycles, BigInt) go without them, as later.
      json = JSON.stringify([method, args.slice(0, 1), Date.now()]);
    }
    let kept = false;
    try {
      storage().setItem(key, json);
      kept = true;
    } catch (e) {}
    early.push([key, json, kept]);
  }

  const ready = inert
    ? Promise.resolve()
    : load()
        .then((m) => {
          // The wasm reads the kept calls from storage; those storage refused come along.
          real = new m.Tracker(
            o,
            early.filter((e) => !e[2]).map((e) => [e[0], e[1]]),
            guard,
          );
          early.length = 0;
        })
        .catch((e) => warn('could not start; events stay queued', e));

  // The status shape is the core's (`Status`, generated into idle-status.js); before the
  // wasm is ready only the kept calls and the browser's online flag are known.
  const earlyStatus = () => ({
    ...IDLE_STATUS,
    pending: early.length,
    online: typeof navigator !== 'undefined' ? navigator.onLine !== false : false,
  });
  const listeners = [];

  const tracker = {
    pendingCount: safe(() => (real ? real.pendingCount() : early.length), 0),
    status: safe(() => (real ? real.status() : earlyStatus()), earlyStatus()),
    onStatus: safe((cb) => {
      if (real) return real.onStatus(cb);
      // Subscribed once the wasm is ready.
      const entry = { cb, off: null };
      listeners.push(entry);
      return () => {
        entry.cb = null;
        if (entry.off) entry.off();
      };
    }, noop),
    clearEvents: safe(() => {
      if (real) return real.clearEvents();
      const n = early.length;
      for (const [key] of early) safe(() => storage().removeItem(key))();
      early.length = 0;
      return n;
    }, 0),
    forceSend: () =>
      ready
        .then(() => (real ? real.forceSend() : { sent: 0, pending: 0 }))
        .catch(() => ({ sent: 0, pending: tracker.pendingCount() })),
    /** Resolves when the wasm is loaded (or failed to load). */
    ready: () => ready,
  };
  tracker.flush = tracker.forceSend;
  METHODS.forEach((m, i) => {
    tracker[m] = safe((...args) => call(m, args.slice(0, ARITY[i])));
  });
  // The hot path, without the generic method's array copies once the wasm is ready.
  const slowTrack = tracker.track;
  tracker.track = function (name, props) {
    if (!real) return slowTrack(name, props);
    try {
      real.track(name, props);
    } catch (e) {}
  };
  ready.then(
    safe(() => {
      for (const entry of listeners) if (real && entry.cb) entry.off = real.onStatus(entry.cb);
      if (real && listeners.some((e) => e.cb)) for (const e of listeners) if (e.cb) safe(e.cb)(real.status());
    }),
  );
  return tracker;
}
