// Script-tag build (dist/tracklet.js): defines window.tracklet and loads tracklet.wasm
// from beside itself.
//
//   <script src=".../tracklet.js" data-endpoint="https://collector.example" data-api-key="KEY"></script>
//
// initialises itself; window.tracklet.track(...) and friends forward to that tracker.
// Calls made through the pre-load snippet (window.tracklet.q) are replayed in order.
import { makeInit, METHODS, VERSION } from './facade.js';
import { wasmLoader } from './wasm-loader.js';

const script = document.currentScript;
const wasmUrl = new URL('tracklet.wasm', (script && script.src) || location.href);
const init = makeInit(wasmLoader(() => wasmUrl));

let current = null;
const pendingCalls = [];
const api = {
  VERSION,
  init(options) {
    current = init(options);
    for (const [m, args] of pendingCalls.splice(0)) forward(m, args);
    return current;
  },
};

function forward(method, args) {
  if (method === 'init') return api.init(...args);
  if (!current) {
    pendingCalls.push([method, args]);
    return method === 'forceSend' ? Promise.resolve({ sent: 0, pending: 0 }) : undefined;
  }
  const f = current[method];
  return typeof f === 'function' ? f.apply(current, args) : undefined;
}

for (const m of [...METHODS, 'forceSend', 'flush', 'clearEvents', 'pendingCount', 'status', 'onStatus']) {
  api[m] = (...args) => forward(m, args);
}

const snippet = window.tracklet;
window.tracklet = api;

const data = (script && script.dataset) || {};
if (data.endpoint && data.apiKey) {
  api.init({
    endpoint: data.endpoint,
    apiKey: data.apiKey,
    debug: data.debug === 'true' || data.debug === '',
    autocapture: data.autocapture === 'false' ? false : undefined,
  });
}
// The pre-load snippet's queue: [[method, args], ...].
if (snippet && Array.isArray(snippet.q)) {
  for (const [m, args] of snippet.q) {
    try {
      forward(m, args || []);
    } catch (e) {}
  }
}
