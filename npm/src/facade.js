// The JavaScript face of Tracklet: a synchronous init() whose calls are kept (in storage)
// until the wasm is ready, error containment (nothing ever throws into the host page),
// page context and autocapture. Queueing, batching and retry live in the wasm core.
//
// Importing this module touches no browser global, so server-side rendering works.

import { bind, guarded, storage } from './binding.js';

export const VERSION = '0.1.0';
const PRE = 'tl1:p:';
// The calls kept (and replayed) until the wasm is ready, and how many arguments each keeps.
export const METHODS = ['track', 'page', 'identify', 'reset', 'optOut', 'optIn'];
const ARITY = [2, 1, 2, 0, 0, 0];

const noop = () => {};
// Prints as `[tracklet] ...`.
const warn = (...a) => console.warn('[tracklet]', ...a);

// `props` as a JSON object string, or undefined. Never throws (cycles, BigInt, ...).
function propsJson(props) {
  if (props == null) return undefined;
  try {
    const obj = typeof props === 'object' && !Array.isArray(props) ? props : { value: props };
    const s = JSON.stringify(obj);
    return s && s[0] === '{' ? s : undefined;
  } catch (e) {
    return undefined;
  }
}

let timezone;
function context() {
  const l = location;
  const s = window.screen || {};
  if (timezone === undefined) {
    try {
      timezone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    } catch (e) {
      timezone = null;
    }
  }
  return JSON.stringify({
    url: l.href,
    path: l.pathname,
    referrer: document.referrer || undefined,
    title: document.title || undefined,
    screen: s.width + 'x' + s.height,
    viewport: innerWidth + 'x' + innerHeight,
    language: navigator.language,
    timezone: timezone || undefined,
    webdriver: navigator.webdriver || undefined,
    sdk: 'tracklet/' + VERSION,
  });
}

function options(o) {
  o = o || {};
  const auto = o.autocapture;
  // `autocapture`: true (or missing) for all, false for none, or {pageView, click, scroll}.
  const on = (k) => auto !== false && (auto || {})[k] !== false;
  return {
    endpoint: o.endpoint,
    apiKey: o.apiKey,
    maxBatchSize: o.maxBatchSize > 0 ? o.maxBatchSize : 50,
    maxWaitTime: o.maxWaitTime >= 0 ? o.maxWaitTime : 5000,
    maxQueueSize: o.maxQueueSize > 0 ? o.maxQueueSize : 1000,
    pageView: on('pageView'),
    click: on('click'),
    scroll: on('scroll'),
    sampling: { ...o.sampling },
    alwaysKeep: [].concat(o.alwaysKeep || []).map(String),
    respectPrivacySignals: o.respectPrivacySignals !== false,
    debug: !!o.debug,
  };
}

/**
 * Makes `init(options)`. `load` resolves to the wasm-bindgen bindings (wasm-loader.js).
 */
export function makeInit(load) {
  // The page's tracker and its options, { tracker, o }: one per page, since every tracker
  // of an origin would share the same stored queue (and capture every page view twice).
  let active = null;
  // Never throws into the page: options that cannot be read give an inert tracker.
  return function init(userOptions) {
    try {
      return start(userOptions);
    } catch (e) {
      warn('init() failed', e);
      return start({});
    }
  };
  function start(userOptions) {
    const o = options(userOptions);
    const log = o.debug ? warn : noop;
    const listeners = new Set();
    let real = null;
    let ready = null;
    // Calls made before the wasm is ready: [key, [method, args, ts], persisted]; persisted:
    // also in storage, under key.
    const early = [];
    let seq = 0;

    const browser = typeof window !== 'undefined' && typeof document !== 'undefined';
    const privacyOff =
      browser &&
      o.respectPrivacySignals &&
      (navigator.doNotTrack === '1' || window.doNotTrack === '1' || navigator.globalPrivacyControl === true);
    const disabled = !browser || privacyOff || !o.endpoint || !o.apiKey;
    if (browser && (!o.endpoint || !o.apiKey)) warn('init() needs endpoint and apiKey');
    if (privacyOff) log('tracking off: Do Not Track / Global Privacy Control is on');
    if (!disabled && active) {
      if (active.o.endpoint !== o.endpoint || active.o.apiKey !== o.apiKey) {
        warn('init() again: the first tracker stays in use');
      }
      return active.tracker;
    }

    const safe = guarded(log);

    function invoke(method, args, at) {
      const [a, b] = args;
      if (method === 'track') return real.track(String(a), propsJson(b), at);
      if (method === 'page') {
        real.setContext(context());
        return real.track('page_view', propsJson(a), at);
      }
      if (method === 'identify') {
        real.identify(String(a));
        return real.track('identify', propsJson(b), at);
      }
      return real[method]();
    }

    function call(method, args) {
      if (method === 'track' && (typeof args[0] !== 'string' || !args[0])) {
        return log('track() needs a non-empty event name');
      }
      if (disabled) return;
      if (real) return invoke(method, args, NaN);
      const ts = Date.now();
      const key = PRE + ts.toString(36) + '.' + (1e6 + seq++) + Math.random().toString(36).slice(2, 6);
      const c = [method, args, ts];
      let persisted = false;
      try {
        storage().setItem(key, JSON.stringify(c));
        persisted = true;
      } catch (e) {}
      early.push([key, c, persisted]);
    }

    // Replays calls kept before the wasm was ready: this page's and any left by a page
    // closed before its wasm loaded. Each key is removed before its call is replayed.
    function replay() {
      const s = storage();
      const calls = new Map();
      for (const [key, c, persisted] of early) if (!persisted) calls.set(key, c);
      if (s) {
        for (let i = 0; i < s.length; i++) {
          const key = s.key(i);
          if (key && key.startsWith(PRE)) {
            try {
              calls.set(key, JSON.parse(s.getItem(key)));
            } catch (e) {
              calls.set(key, null);
            }
          }
        }
      }
      early.length = 0;
      for (const key of [...calls.keys()].sort()) {
        const c = calls.get(key);
        try {
          if (s) s.removeItem(key);
        } catch (e) {}
        if (Array.isArray(c) && METHODS.includes(c[0])) safe(invoke)(c[0], c[1] || [], c[2]);
      }
    }

    // Tells the onStatus() listeners; one that throws is logged and the others still hear.
    const emit = safe((json) => {
      const st = JSON.parse(json);
      for (const cb of listeners) safe(cb)(st);
    });

    if (!disabled) {
      ready = load()
        .then((m) => {
          real = bind(m, o, emit, log, listeners);
          real.setContext(context());
          replay();
          if (listeners.size) emit(real.status());
        })
        .catch((e) => {
          warn('could not start; events stay queued', e);
        });
    }

    const earlyStatus = () => ({
      pending: early.length,
      inFlight: 0,
      lastError: null,
      lastSentAt: null,
      nextRetryAt: null,
      online: browser ? navigator.onLine : false,
      rejected: 0,
      dropped: 0,
      optedOut: false,
    });

    const tracker = {
      pendingCount: safe(() => (real ? real.pending() : early.length), 0),
      status: () => safe(() => (real ? JSON.parse(real.status()) : earlyStatus()))() || earlyStatus(),
      onStatus: safe((cb) => {
        listeners.add(cb);
        return () => listeners.delete(cb);
      }, noop),
      clearEvents: safe(() => {
        const n = early.length;
        for (const [key] of early) {
          try {
            storage().removeItem(key);
          } catch (e) {}
        }
        early.length = 0;
        return n + (real ? real.clear() : 0);
      }, 0),
      forceSend: () =>
        Promise.resolve(ready)
          .then(() => (real ? real.forceSend() : 0))
          .catch((e) => (log(e), 0))
          .then((sent) => ({ sent, pending: tracker.pendingCount() })),
      /** Resolves when the wasm is loaded (or failed to load). */
      ready: () => Promise.resolve(ready),
    };
    tracker.flush = tracker.forceSend;
    // track(name, props), page(props), identify(userId, traits), reset(), optOut(), optIn().
    METHODS.forEach((m, i) => {
      tracker[m] = safe((...args) => {
        call(m, args.slice(0, ARITY[i]));
      });
    });

    if (!disabled) {
      active = { tracker, o };
      safe(autocapture)(tracker, o, safe);
    }
    return tracker;
  }
}

// ---- autocapture --------------------------------------------------------------------

const SKIP_TEXT = /^(INPUT|SELECT|TEXTAREA|OPTION)$/;

function cssPath(el) {
  const parts = [];
  for (let n = el; n && n.nodeType === 1 && parts.length < 5; n = n.parentElement) {
    let p = n.tagName.toLowerCase();
    if (n.id) {
      parts.unshift(p + '#' + n.id);
      break;
    }
    const parent = n.parentElement;
    if (parent) {
      const same = [...parent.children].filter((c) => c.tagName === n.tagName);
      if (same.length > 1) p += ':nth-of-type(' + (same.indexOf(n) + 1) + ')';
    }
    parts.unshift(p);
  }
  return parts.join(' > ');
}

function describeClick(target) {
  const el = target.closest('a,button,input,select,textarea,label,summary,[role=button],[role=link],[onclick]') || target;
  if (el.closest('[data-tracklet-ignore]')) return null;
  const props = { tag: el.tagName.toLowerCase(), path: cssPath(el) };
  if (el.id) props.id = el.id;
  const cls = typeof el.className === 'string' ? el.className.trim() : '';
  if (cls) props.classes = cls.split(/\s+/).slice(0, 10);
  const href = el.getAttribute('href');
  if (href) props.href = href.slice(0, 500);
  // Never the value or typed text of form fields or editable regions.
  if (!SKIP_TEXT.test(el.tagName) && !el.isContentEditable && !el.closest('[contenteditable]')) {
    const text = (el.innerText || el.textContent || '').trim().replace(/\s+/g, ' ');
    if (text) props.text = text.slice(0, 100);
  }
  if (el.tagName === 'INPUT') props.type = el.type;
  return props;
}

// `safe` guards the browser's callbacks (see binding.js `guarded`).
function autocapture(t, o, safe) {
  let lastPath = null;
  let marks = new Set();
  const pageView = safe(() => {
    const path = location.pathname;
    if (path === lastPath) return;
    lastPath = path;
    marks = new Set();
    t.page({ path, url: location.href, title: document.title || undefined, referrer: document.referrer || undefined });
  });
  if (o.pageView) {
    pageView();
    for (const m of ['pushState', 'replaceState']) {
      const orig = history[m];
      history[m] = function () {
        const r = orig.apply(this, arguments);
        pageView();
        return r;
      };
    }
    addEventListener('popstate', pageView);
    addEventListener(
      'pageshow',
      safe((e) => {
        if (e.persisted) {
          lastPath = null;
          pageView();
        }
      }),
    );
  }
  if (o.click) {
    document.addEventListener(
      'click',
      safe((e) => {
        const props = e.target && e.target.closest ? describeClick(e.target) : null;
        if (props) t.track('click', props);
      }),
      { capture: true, passive: true },
    );
  }
  if (o.scroll) {
    let timer = 0;
    // At most one check per 200 ms of scrolling.
    const check = safe(() => {
      timer = 0;
      const d = document.documentElement;
      const total = Math.max(d.scrollHeight, document.body ? document.body.scrollHeight : 0);
      const seen = total <= innerHeight ? 100 : ((scrollY + innerHeight) / total) * 100;
      for (const m of [25, 50, 75, 100]) {
        if (seen >= m - 0.5 && !marks.has(m)) {
          marks.add(m);
          t.track('scroll', { depth: m, path: location.pathname });
        }
      }
    });
    addEventListener(
      'scroll',
      () => {
        if (!timer) timer = setTimeout(check, 200);
      },
      { passive: true },
    );
  }
}
