// `tracklet/react`: a provider that starts one tracker, a hook that re-renders on its
// status, and a small sync badge.
//
//   <TrackletProvider options={{ endpoint, apiKey }}>  ... </TrackletProvider>
//   const { track, pendingCount, isProcessing, forceSend, clearEvents } = useTracklet();
//
// The tracker comes from the default entry (`tracklet`, wasm inlined) unless the provider
// is given one (`tracker={...}`, e.g. made with `tracklet/slim`). Safe to import and render
// on the server: there the tracker is inert and the hook reports an empty queue.
import * as React from 'react';
import { createContext, createElement, useContext, useEffect, useMemo, useState } from 'react';
import { init } from './index.js';
import { IDLE_STATUS } from './idle-status.js';

// One tracker per distinct options, so StrictMode's double render, remounted layouts and
// hot reloads never start a second one (two trackers would capture every page view twice).
const trackers = new Map();
function trackerFor(options) {
  let key;
  try {
    key = JSON.stringify(options || {});
  } catch (e) {
    return init(options);
  }
  let t = trackers.get(key);
  if (!t) trackers.set(key, (t = init(options)));
  return t;
}

// The core's status shape (`Status::default()`, generated into idle-status.js).
const idle = IDLE_STATUS;
const noop = () => {};
// What the hook sees outside a provider: calls do nothing, nothing throws.
const inert = {
  track: noop,
  page: noop,
  identify: noop,
  reset: noop,
  optOut: noop,
  optIn: noop,
  forceSend: () => Promise.resolve({ sent: 0, pending: 0 }),
  flush: () => Promise.resolve({ sent: 0, pending: 0 }),
  clearEvents: () => 0,
  pendingCount: () => 0,
  status: () => idle,
  onStatus: () => noop,
  ready: () => Promise.resolve(),
};

const Context = createContext(null);

export function TrackletProvider(props) {
  const { options, tracker, children } = props;
  const t = tracker || trackerFor(options);
  return createElement(Context.Provider, { value: t }, children);
}

function same(a, b) {
  for (const k in idle) if (a[k] !== b[k]) return false;
  return true;
}

// One status store per tracker, shared by every hook using it, fed by the tracker's
// onStatus() (called after every change, the start of a send included).
const stores = new WeakMap();
function storeFor(t) {
  let store = stores.get(t);
  if (store) return store;
  const subscribers = new Set();
  let current = t.status() || idle;
  let unsubscribe = null;
  const update = (s) => {
    if (s && !same(current, s)) {
      current = s;
      for (const fn of subscribers) fn(s);
    }
  };
  store = {
    get: () => current,
    subscribe(fn) {
      subscribers.add(fn);
      if (!unsubscribe) unsubscribe = t.onStatus(update);
      update(t.status());
      return () => {
        subscribers.delete(fn);
        if (!subscribers.size) {
          unsubscribe();
          unsubscribe = null;
        }
      };
    },
  };
  stores.set(t, store);
  return store;
}

const serverStatus = () => idle;

// The tracker's status as React state. The server (and hydration) sees the idle status, so
// a server-rendered page hydrates without a mismatch; the browser then shows the real one.
// React 18+ has useSyncExternalStore for exactly this; older React renders the idle status
// first and updates after mounting.
function useStore(store) {
  if (React.useSyncExternalStore) return React.useSyncExternalStore(store.subscribe, store.get, serverStatus);
  const [status, setStatus] = useState(idle);
  useEffect(() => {
    setStatus(store.get());
    return store.subscribe(setStatus);
  }, [store]);
  return status;
}

export function useTracklet() {
  const provided = useContext(Context);
  const t = provided || inert;
  const store = storeFor(t);
  const status = useStore(store);
  return useMemo(
    () => ({
      tracker: t,
      status,
      pendingCount: status.pending,
      isProcessing: status.inFlight > 0,
      track: t.track,
      page: t.page,
      identify: t.identify,
      reset: t.reset,
      optOut: t.optOut,
      optIn: t.optIn,
      forceSend: t.forceSend,
      clearEvents: t.clearEvents,
    }),
    [t, status],
  );
}

/**
 * A badge: "3 pending", "sending 3…", "all sent", or "retrying: <error>" after a failure.
 * `data-state` is `idle`, `pending`, `sending` or `error` for styling.
 */
export function SyncStatus(props) {
  const { className, style } = props || {};
  const { status, pendingCount, isProcessing } = useTracklet();
  const state = isProcessing ? 'sending' : status.lastError && pendingCount ? 'error' : pendingCount ? 'pending' : 'idle';
  const text =
    state === 'sending'
      ? 'sending ' + pendingCount + '…'
      : state === 'error'
        ? pendingCount + ' pending, retrying (' + status.lastError + ')'
        : state === 'pending'
          ? pendingCount + ' pending'
          : 'all sent';
  return createElement(
    'span',
    {
      className: 'tracklet-sync' + (className ? ' ' + className : ''),
      style,
      'data-state': state,
      'data-pending': pendingCount,
      role: 'status',
      'aria-live': 'polite',
    },
    text,
  );
}
