// Compiled with tsc --noEmit against the installed package's hand-written declarations.
import { init, VERSION, type Tracker, type TrackerStatus, type TrackletOptions } from 'tracklet';
import tracklet from 'tracklet';
import { init as initSlim, type SlimOptions } from 'tracklet/slim';
import { TrackletProvider, useTracklet, SyncStatus, type UseTracklet } from 'tracklet/react';
import { createElement } from 'react';

const options: TrackletOptions = {
  endpoint: 'https://c.example',
  apiKey: 'k',
  maxBatchSize: 10,
  maxWaitTime: 1000,
  maxQueueSize: 500,
  autocapture: { pageView: true, click: false },
  sampling: { scroll: 0.1 },
  alwaysKeep: ['Purchase'],
  respectPrivacySignals: true,
  debug: false,
};
const t: Tracker = init(options);
const v: string = VERSION;
const same: Tracker = tracklet.init(options);
t.track('x');
t.track('x', { a: 1, nested: { b: [1, 2] } });
t.page();
t.identify('u', { plan: 'pro' });
t.reset();
t.optOut();
t.optIn();
const n: number = t.pendingCount() + t.clearEvents();
const st: TrackerStatus = t.status();
const fields: [number, number, string | null, number | null, number | null, boolean, number, number, boolean] = [
  st.pending, st.inFlight, st.lastError, st.lastSentAt, st.nextRetryAt, st.online, st.rejected, st.dropped, st.optedOut,
];
const off: () => void = t.onStatus((s) => s.pending);
async function f() {
  const r = await t.forceSend();
  const sent: number = r.sent + r.pending;
  await t.flush();
  await t.ready();
  return sent;
}
const slimOptions: SlimOptions = { ...options, wasm: new URL('https://c.example/tracklet.wasm') };
initSlim(slimOptions);
initSlim({ ...options, wasm: new Uint8Array(8) });

// @ts-expect-error apiKey is required
init({ endpoint: 'x' });
// @ts-expect-error the slim entry needs wasm
initSlim(options);
// @ts-expect-error props are an object
t.track('x', 5);
// @ts-expect-error unknown option
init({ ...options, maxBatch: 3 });

function Badge() {
  const h: UseTracklet = useTracklet();
  const p: number = h.pendingCount;
  const b: boolean = h.isProcessing;
  h.track('y', { p, b });
  void h.forceSend().then((r) => r.sent);
  const removed: number = h.clearEvents();
  return createElement(SyncStatus, { className: 'x' + removed });
}
createElement(TrackletProvider, { options }, createElement(Badge));
createElement(TrackletProvider, { tracker: t });
void [v, same, n, fields, off, f];
