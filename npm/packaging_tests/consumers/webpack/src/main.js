import { init, VERSION } from 'tracklet';
import tracklet from 'tracklet';

const q = new URLSearchParams(location.search);
const tracker = init({
  endpoint: q.get('endpoint'),
  apiKey: 'webpack-key',
  maxBatchSize: 100,
  maxWaitTime: 600000,
  autocapture: false,
});
tracker.track('Webpack Loaded', { version: VERSION });
tracker.track('Webpack Clicked', { n: 2 });
window.tracker = tracker;
window.defaultExportMatches = tracklet.init === init && tracklet.VERSION === VERSION;
