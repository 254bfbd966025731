import { init } from 'tracklet/slim';
import wasm from 'tracklet/tracklet.wasm';

const q = new URLSearchParams(location.search);
const tracker = init({
  endpoint: q.get('endpoint'),
  apiKey: 'webpack-slim-key',
  maxBatchSize: 100,
  maxWaitTime: 600000,
  autocapture: false,
  wasm,
});
tracker.track('Slim Loaded', { wasm: String(wasm) });
window.tracker = tracker;
