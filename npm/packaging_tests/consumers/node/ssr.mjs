// Server-side: importing every entry must not throw, and init() gives an inert tracker.
// Prints one JSON line with what it saw; run.mjs asserts on it.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const out = {};
const main = await import('tracklet');
const slim = await import('tracklet/slim');
const react = await import('tracklet/react');
assert.equal(typeof main.init, 'function');
assert.equal(main.default.init, main.init);
assert.equal(typeof slim.init, 'function');
assert.equal(slim.default.init, slim.init);
for (const k of ['TrackletProvider', 'useTracklet', 'SyncStatus']) assert.equal(typeof react[k], 'function', k);
out.version = main.VERSION;

for (const [name, init] of [['tracklet', main.init], ['tracklet/slim', slim.init]]) {
  const t = init({ endpoint: 'http://127.0.0.1:9', apiKey: 'k', wasm: 'http://127.0.0.1:9/x.wasm' });
  assert.equal(t.track('Server Event', { a: 1 }), undefined, name);
  t.page();
  t.identify('u1', { plan: 'pro' });
  t.reset();
  t.optOut();
  t.optIn();
  assert.equal(t.pendingCount(), 0, name);
  assert.equal(t.clearEvents(), 0, name);
  assert.deepEqual(await t.forceSend(), { sent: 0, pending: 0 }, name);
  const st = t.status();
  assert.deepEqual(Object.keys(st).sort(), ['dropped', 'inFlight', 'lastError', 'lastSentAt', 'nextRetryAt', 'online', 'optedOut', 'pending', 'rejected'], name);
  assert.equal(st.pending, 0);
  const off = t.onStatus(() => {});
  assert.equal(typeof off, 'function');
  off();
  await t.ready();
}

// React server rendering with the provider, the hook and the badge.
const { createElement } = await import('react');
const { renderToString } = await import('react-dom/server');
function Child() {
  const { pendingCount, isProcessing, track } = react.useTracklet();
  track('During SSR');
  return createElement('b', null, `hook:${pendingCount}:${isProcessing}`);
}
out.html = renderToString(
  createElement(react.TrackletProvider, { options: { endpoint: 'http://127.0.0.1:9', apiKey: 'k' } }, createElement(react.SyncStatus), createElement(Child)),
);
// Outside a provider the hook is inert too.
out.htmlNoProvider = renderToString(createElement(Child));

// The wasm file is exported for the slim entry and the script tag's files are shipped.
const wasmPath = fileURLToPath(import.meta.resolve('tracklet/tracklet.wasm'));
const bytes = readFileSync(wasmPath);
assert.deepEqual([...bytes.subarray(0, 4)], [0, 0x61, 0x73, 0x6d], 'tracklet.wasm starts with \\0asm');
assert.ok(existsSync(fileURLToPath(import.meta.resolve('tracklet/tracklet.js'))));
console.log(JSON.stringify(out));
