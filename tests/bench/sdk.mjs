// SDK benchmark in headless Chromium (`cargo xtask bench sdk`): track() cost with
// persistence on, and what goes over the wire. Prints a markdown table; never fails on speed.
//
// The page is served cross-origin isolated (COOP/COEP), which gives performance.now() 5 µs
// resolution. A local Node server plays the collector (same answers as the real one), on a
// second port so requests are cross-origin as in production and any CORS preflight shows.
import { createServer } from 'node:http';
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { chromium } from 'playwright-core';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const dist = join(root, 'npm/dist');
const CALLS = 10000;
const WIRE_EVENTS = 1000;

const page = `<!doctype html><meta charset="utf-8"><title>bench</title><script src="/tracklet.js"></script>`;
const pageServer = createServer((req, res) => {
  const h = { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp' };
  if (req.url === '/tracklet.js') return res.writeHead(200, { ...h, 'Content-Type': 'text/javascript' }).end(readFileSync(join(dist, 'tracklet.js')));
  if (req.url === '/tracklet.wasm') return res.writeHead(200, { ...h, 'Content-Type': 'application/wasm' }).end(readFileSync(join(dist, 'tracklet.wasm')));
  res.writeHead(200, { ...h, 'Content-Type': 'text/html' }).end(page);
});

const wire = { requests: 0, options: 0, bytes: 0, ids: new Set(), dropped: 0, contentTypes: new Set() };
const api = createServer((req, res) => {
  const cors = {
    'Access-Control-Allow-Origin': req.headers.origin || '*',
    'Access-Control-Expose-Headers': 'Retry-After',
    'Cross-Origin-Resource-Policy': 'cross-origin',
  };
  if (req.method === 'OPTIONS') {
    wire.options++;
    return res.writeHead(204, { ...cors, 'Access-Control-Allow-Headers': '*', 'Access-Control-Allow-Methods': 'POST' }).end();
  }
  const chunks = [];
  req.on('data', (d) => chunks.push(d));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    wire.requests++;
    wire.bytes += body.length;
    wire.contentTypes.add(req.headers['content-type']);
    const batch = JSON.parse((body[0] === 0x1f ? gunzipSync(body) : body).toString());
    for (const e of batch.events) wire.ids.add(e.id);
    wire.dropped += batch.dropped || 0;
    res.writeHead(200, { ...cors, 'Content-Type': 'application/json' }).end(JSON.stringify({ accepted: batch.events.length, duplicates: 0, rejected: [] }));
  });
});

const listen = (s) => new Promise((r) => s.listen(0, '127.0.0.1', () => r(s.address().port)));
const pagePort = await listen(pageServer);
const apiPort = await listen(api);
const endpoint = `http://127.0.0.1:${apiPort}`;

const profile = mkdtempSync(join(tmpdir(), 'tracklet-bench-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const tab = await context.newPage();
await tab.goto(`http://127.0.0.1:${pagePort}/`);

// 1. track() cost: 10,000 calls in chunks of 10 per task (yielding through a MessageChannel,
// so the SDK's own timers and network callbacks interleave as on a real page).
const cost = await tab.evaluate(
  async ({ endpoint, CALLS }) => {
    const t = window.tracklet.init({ endpoint, apiKey: 'bench', autocapture: false, maxQueueSize: 100000 });
    await t.ready();
    const lat = new Float64Array(CALLS);
    const ch = new MessageChannel();
    const yieldTask = () => new Promise((r) => { ch.port1.onmessage = r; ch.port2.postMessage(0); });
    const longTasks = [];
    new PerformanceObserver((l) => longTasks.push(...l.getEntries())).observe({ type: 'longtask' });
    const wall0 = performance.now();
    for (let i = 0; i < CALLS; i += 10) {
      for (let j = i; j < i + 10; j++) {
        const t0 = performance.now();
        t.track('Song Played', { songId: j, title: 'Song ' + j, duration: 180, seq: j });
        lat[j] = performance.now() - t0;
      }
      await yieldTask();
    }
    const wallMs = performance.now() - wall0;
    await t.forceSend();
    const sorted = [...lat].sort((a, b) => a - b);
    const total = lat.reduce((a, b) => a + b, 0);
    return {
      isolated: self.crossOriginIsolated,
      callsPerSec: CALLS / (total / 1000),
      // Including the SDK's own work between the calls (storage writes, sends, timers) and
      // the yields themselves.
      wallCallsPerSec: CALLS / (wallMs / 1000),
      p50us: sorted[Math.floor(CALLS * 0.5)] * 1000,
      p99us: sorted[Math.floor(CALLS * 0.99)] * 1000,
      maxus: sorted[CALLS - 1] * 1000,
      longTasks: longTasks.length,
      longTaskMs: longTasks.reduce((a, e) => a + e.duration, 0),
      pendingAfter: t.pendingCount(),
    };
  },
  { endpoint, CALLS },
);
const costDelivered = wire.ids.size;
// Events the SDK dropped for space (its queue holds at most 2 MB of JSON) and reported.
const costDropped = wire.dropped;

// 2. Wire: 1,000 events with default batching, then forceSend().
await tab.evaluate(() => localStorage.clear());
await tab.reload();
Object.assign(wire, { requests: 0, options: 0, bytes: 0, ids: new Set(), dropped: 0, contentTypes: new Set() });
const wireRun = await tab.evaluate(
  async ({ endpoint, WIRE_EVENTS }) => {
    const t = window.tracklet.init({ endpoint, apiKey: 'bench', autocapture: false });
    for (let j = 0; j < WIRE_EVENTS; j++) t.track('Song Played', { songId: j, title: 'Song ' + j, duration: 180, seq: j });
    const r = await t.forceSend();
    return { pending: r.pending };
  },
  { endpoint, WIRE_EVENTS },
);

await context.close();
rmSync(profile, { recursive: true, force: true });
pageServer.close();
api.close();

const f = (n, d = 1) => n.toLocaleString('en-US', { maximumFractionDigits: d });
const date = new Date().toISOString().slice(0, 10);
console.log(`\nTracklet SDK benchmark, ${date}, headless Chromium (cross-origin isolated: ${cost.isolated})\n`);
console.log('| measure | result |');
console.log('| --- | --- |');
console.log(`| track() calls/s (10,000 calls, persistence on) | ${f(cost.callsPerSec, 0)} |`);
console.log(`| track() p50 / p99 / max | ${f(cost.p50us)} µs / ${f(cost.p99us)} µs / ${f(cost.maxus)} µs |`);
console.log(`| whole loop, SDK's async work and the yields included | ${f(cost.wallCallsPerSec, 0)} calls/s |`);
console.log(`| long tasks during the run | ${cost.longTasks} (${f(cost.longTaskMs, 0)} ms) |`);
console.log(`| cost run: events delivered after forceSend() + dropped for space and reported | ${f(costDelivered, 0)} + ${f(costDropped, 0)} of ${f(CALLS, 0)} |`);
console.log(`| wire: requests for 1,000 events (POST + OPTIONS) | ${wire.requests} + ${wire.options} |`);
console.log(`| wire: body bytes per event | ${f(wire.bytes / Math.max(1, wire.ids.size))} B (${f(wire.bytes / 1024)} KB in all) |`);
console.log(`| wire: events arrived / pending after | ${wire.ids.size} / ${wireRun.pending} |`);
console.log(`| wire: content type | ${[...wire.contentTypes].join(', ')} (gzip body) |`);
