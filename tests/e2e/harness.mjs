// End-to-end test harness: the real collector binary on a fresh Postgres database, the
// built SDK and example pages served by that collector, and headless Chromium.
//
// Nothing here skips: a missing browser, collector binary or Postgres fails the test with
// a message saying what to install.
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, request as httpRequest } from 'node:http';
import { createServer } from 'node:net';
import { gunzipSync } from 'node:zlib';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { before, after, beforeEach, afterEach } from 'node:test';
import pg from 'pg';
import { chromium } from 'playwright-core';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const BIN = process.env.TRACKLET_COLLECTOR_BIN || join(root, 'target/debug/tracklet-collector');
const DATABASE_URL = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/postgres';

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function need(cond, msg) {
  if (!cond) throw new Error(msg);
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A fresh Postgres database; `url` to use it, `query()` to read it, `drop()` at the end. */
export async function freshDatabase() {
  const admin = new pg.Client({ connectionString: DATABASE_URL });
  try {
    await admin.connect();
  } catch (e) {
    throw new Error(
      `Postgres is required at ${DATABASE_URL} (${e.message}): install postgresql and start it on 127.0.0.1:5432, or set DATABASE_URL`,
    );
  }
  const name = 'tracklet_e2e_' + process.pid + '_' + Math.random().toString(36).slice(2, 8);
  await admin.query(`CREATE DATABASE ${name}`);
  const u = new URL(DATABASE_URL);
  u.pathname = '/' + name;
  const url = u.toString();
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  return {
    url,
    query: (sql, params) => client.query(sql, params).then((r) => r.rows),
    async drop() {
      await client.end().catch(() => {});
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => {});
      await admin.end().catch(() => {});
    },
  };
}

/** The previous release's script-tag build (tracklet.js and tracklet.wasm), served as /old/. */
export const OLD_BUILD = join(root, 'tests/e2e/fixtures/tracklet-0.1.0');

/**
 * Starts the real collector on a fresh database, serving the examples, the SDK build
 * (npm/dist as /dist/) and the previous release's build (as /old/) from the same origin.
 * Returns {origin, key, db, site, stop()}.
 */
export async function startCollector({ extraOrigins = [] } = {}) {
  need(existsSync(BIN), `the collector binary is missing at ${BIN}: run cargo xtask test (it builds it)`);
  need(existsSync(join(root, 'npm/dist/tracklet.js')), 'npm/dist/tracklet.js is missing: run cargo xtask build');
  const db = await freshDatabase();
  const port = await freePort();
  const origin = `http://127.0.0.1:${port}`;
  const site = mkdtempSync(join(tmpdir(), 'tracklet-site-'));
  cpSync(join(root, 'examples'), site, { recursive: true, filter: (p) => !p.includes('node_modules') });
  cpSync(join(root, 'npm/dist'), join(site, 'dist'), { recursive: true });
  cpSync(OLD_BUILD, join(site, 'old'), { recursive: true });
  const dbArgs = ['--database-url', db.url];
  const originArgs = [origin, `http://localhost:${port}`, ...extraOrigins].flatMap((o) => ['--origin', o]);
  const project = JSON.parse(
    execFileSync(BIN, [...dbArgs, 'projects', 'add', '--name', 'e2e', ...originArgs], { encoding: 'utf8' }),
  );
  const key = project.write_key;
  writeFileSync(join(site, 'music', 'config.js'), `window.TRACKLET_CONFIG = ${JSON.stringify({ endpoint: origin, apiKey: key })};`);
  const proc = spawn(BIN, [...dbArgs, 'serve', '--listen', `127.0.0.1:${port}`, '--static-dir', site], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  proc.stderr.on('data', (d) => (log += d));
  const deadline = Date.now() + 20000;
  for (;;) {
    try {
      const r = await fetch(origin + '/healthz');
      if (r.ok) break;
    } catch (e) {}
    if (proc.exitCode !== null || Date.now() > deadline) {
      throw new Error('the collector did not start:\n' + log);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    origin,
    port,
    key,
    project,
    db,
    site,
    log: () => log,
    async stop() {
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
      await db.drop();
      rmSync(site, { recursive: true, force: true });
    },
  };
}

function parseBody(buf) {
  try {
    const text = buf[0] === 0x1f && buf[1] === 0x8b ? gunzipSync(buf).toString('utf8') : buf.toString('utf8');
    return JSON.parse(text);
  } catch (e) {
    return null;
  }
}

/**
 * A small HTTP proxy in front of the collector (point the SDK's endpoint at `origin`). It
 * sees every request the pages make, unload beacons included, and records them:
 * - `requests`: {method, path, status, body, answer} in arrival order (`status` 'reset' when
 *   the connection was cut);
 * - `answers`: the collector's 200 answers to POST /v1/batch, {accepted, duplicates} summed;
 * - `sent`: how many times each event id was sent in a POST /v1/batch (`sentTwice()` lists
 *   the ids sent more than once), whatever the answer;
 * - `statusQueries()`: the POST /v1/batch/status requests that were made.
 * `decide(request)` (settable) injects failures: 'forward' (default), a status number to
 * answer with instead of the collector (with the CORS headers the collector sends), or
 * 'reset' to cut the connection without an answer, or 'lose-answer' to forward the request
 * and then cut the connection instead of passing the collector's answer back.
 */
export async function startProxy(target, decide = () => 'forward') {
  const t = new URL(target);
  const proxy = {
    decide,
    requests: [],
    answers: { accepted: 0, duplicates: 0 },
    sent: new Map(),
    sentTwice: () => [...proxy.sent].filter(([, n]) => n > 1).map(([id]) => id),
    statusQueries: () => proxy.requests.filter((r) => r.method === 'POST' && r.path === '/v1/batch/status'),
  };
  const server = createHttpServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const raw = Buffer.concat(chunks);
    const seen = { method: req.method, path: new URL(req.url, target).pathname, status: 0, body: null, answer: null };
    seen.body = raw.length ? parseBody(raw) : null;
    proxy.requests.push(seen);
    if (seen.method === 'POST' && seen.path === '/v1/batch') {
      for (const e of seen.body?.events || []) proxy.sent.set(e.id, (proxy.sent.get(e.id) || 0) + 1);
    }
    const d = proxy.decide(seen);
    if (d === 'reset') {
      seen.status = 'reset';
      req.socket.destroy();
      return;
    }
    if (typeof d === 'number') {
      seen.status = d;
      const headers = { 'Content-Type': 'application/json', 'Retry-After': '1' };
      if (req.headers.origin) {
        Object.assign(headers, {
          'Access-Control-Allow-Origin': req.headers.origin,
          'Access-Control-Expose-Headers': 'Retry-After',
          Vary: 'Origin',
        });
      }
      res.writeHead(d, headers);
      res.end('{"error":"unavailable","message":"injected by the test proxy"}');
      return;
    }
    const headers = { ...req.headers, host: t.host };
    delete headers['accept-encoding']; // answers in plain text, so they can be read here
    const up = httpRequest({ host: t.hostname, port: t.port, method: req.method, path: req.url, headers }, (r) => {
      const back = [];
      r.on('data', (c) => back.push(c));
      r.on('end', () => {
        const body = Buffer.concat(back);
        seen.status = r.statusCode;
        seen.answer = parseBody(body);
        if (seen.method === 'POST' && seen.path === '/v1/batch' && r.statusCode === 200 && seen.answer) {
          proxy.answers.accepted += seen.answer.accepted;
          proxy.answers.duplicates += seen.answer.duplicates;
        }
        if (d === 'lose-answer') {
          // Committed, but the page never hears it (a request cut off as the page goes).
          seen.status = `${r.statusCode}, answer lost`;
          req.socket.destroy();
          return;
        }
        res.writeHead(r.statusCode, r.headers);
        res.end(body);
      });
    });
    up.on('error', () => {
      seen.status = 'upstream error';
      req.socket.destroy();
    });
    up.end(raw);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  proxy.origin = `http://127.0.0.1:${server.address().port}`;
  proxy.close = () =>
    new Promise((r) => {
      server.closeAllConnections();
      server.close(r);
    });
  return proxy;
}

/** Headless Chromium with a fresh profile (kept across pages of one test). */
export async function launchBrowser() {
  need(
    existsSync(CHROMIUM),
    `Chromium is required at ${CHROMIUM}: apt-get update && apt-get install -y chromium chromium-driver (or set CHROMIUM_PATH)`,
  );
  const profile = mkdtempSync(join(tmpdir(), 'tracklet-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Polls `fn` until it returns a truthy value (or throws after `ms`). */
export async function eventually(fn, ms = 15000, what = 'condition') {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Waits until the page's `window.tracker` has its wasm loaded (calls before that are
 * kept as early calls, which `pendingCount()` counts differently). */
export async function sdkReady(page) {
  await page.waitForFunction(() => window.tracker);
  await page.evaluate(() => window.tracker.ready());
}

/**
 * Tracks `n` events ('Song Played', props {seq}) with the page's `window.tracker` and leaves
 * for `origin`/index.html in the same task, like a click handler that follows a link; waits
 * until the proxy saw the unload beacon answered. `run(fn, arg)` runs `fn(arg)` in the page
 * (Playwright's page.evaluate, or the Selenium equivalent). Returns the beacon's
 * {batch_id, events}.
 */
export async function leaveWithQueuedEvents(run, proxy, origin, n) {
  assert.equal(await run(() => window.tracker.pendingCount()), 0, 'an empty queue to start with');
  await run(
    ({ n, origin }) => {
      for (let i = 0; i < n; i++) window.tracker.track('Song Played', { seq: i });
      location.assign(origin + '/index.html');
    },
    { n, origin },
  );
  const beacon = await eventually(
    () => proxy.requests.find((r) => r.path === '/v1/batch' && r.status === 200),
    15000,
    'the unload beacon to be answered',
  );
  assert.ok(beacon.body.batch_id, 'the beacon names its batch');
  return { batch_id: beacon.body.batch_id, events: beacon.body.events.length };
}

/**
 * An outage and the recovery, in a page whose batches (maxBatchSize 5, maxWaitTime 500) the
 * collector answers with 503 until `recover()`: 12 events tracked are all kept, sending backs
 * off (`attempts()` counts the refused requests), and once the collector is back the backoff
 * timer alone delivers them all (no forceSend()). `run(fn, arg)` runs `fn(arg)` in the page;
 * `count()` counts rows.
 */
export async function outageThenRecovery(run, count, { attempts, recover }) {
  await run(() => {
    for (let i = 0; i < 12; i++) window.tracker.track('Song Played', { seq: i });
  });
  await eventually(() => run(() => window.tracker.status().lastError === 'HTTP 503'), 10000, 'a 503');
  const st = await run(() => window.tracker.status());
  assert.equal(st.pending, 12, 'all events kept');
  assert.ok(st.nextRetryAt > Date.now() - 1000, 'a retry is scheduled');
  await new Promise((r) => setTimeout(r, 2500));
  assert.ok(attempts() >= 2 && attempts() <= 8, `backed off (${attempts()} attempts in about 3 s)`);
  assert.equal(await count(), 0);
  recover();
  await eventually(async () => (await count()) === 12, 20000, 'all 12 rows after recovery');
  await eventually(() => run(() => window.tracker.status().pending === 0), 5000, 'an empty queue');
  assert.equal((await run(() => window.tracker.status())).nextRetryAt, null);
}

/**
 * After leaveWithQueuedEvents() and a return to a page that emptied its queue: that page
 * asked which batches arrived, the collector said the beacon's had, and no event of the `n`
 * was sent twice.
 */
export function assertAskedNotResent(proxy, beacon, n) {
  const asked = proxy.statusQueries();
  assert.ok(asked.length >= 1, 'the page asked POST /v1/batch/status');
  assert.ok(
    asked.some((q) => q.status === 200 && q.answer?.arrived?.includes(beacon.batch_id)),
    `the collector said the beacon's batch arrived (${JSON.stringify(asked.map((q) => [q.status, q.body, q.answer]))})`,
  );
  assert.deepEqual(proxy.answers, { accepted: n, duplicates: 0 }, 'every event accepted once, no duplicate');
  assert.deepEqual(proxy.sentTwice(), [], 'no event was sent twice');
}

/** Asserts that the events table holds exactly the events with props.seq 0..n-1, each once. */
export async function assertEachSeqOnce(db, n) {
  const rows = await db.query("SELECT (props->>'seq')::int AS seq, count(*)::int AS n FROM events GROUP BY 1 ORDER BY 1");
  assert.deepEqual(
    rows.map((r) => r.seq),
    [...Array(n).keys()],
    'every event arrived',
  );
  assert.deepEqual(rows.filter((r) => r.n !== 1), [], 'no event stored twice');
  const [{ all, ids }] = await db.query('SELECT count(*)::int AS all, count(DISTINCT id)::int AS ids FROM events');
  assert.deepEqual({ all, ids }, { all: n, ids: n });
}

/** The page's localStorage keys that start with `prefix`, sorted. */
export function storedKeys(page, prefix) {
  return page.evaluate((prefix) => Object.keys(localStorage).filter((k) => k.startsWith(prefix)).sort(), prefix);
}

/** The music page with the SDK pointed at the collector. */
export function musicUrl(c, params = {}) {
  const q = new URLSearchParams({ endpoint: c.origin, apiKey: c.key, ...params });
  return `${c.origin}/music/?${q}`;
}

/**
 * The hooks every browser test file uses: one collector (and database) per file, and for
 * each test an empty `events` table and a fresh browser profile (from `launch`, headless
 * Chromium by default). `use(collector, browser)` receives them; `count(where)` counts rows.
 */
export function collectorSuite(use, launch = launchBrowser) {
  let c;
  let browser;
  before(async () => {
    c = await startCollector();
    use(c, undefined);
  });
  after(async () => {
    await c?.stop();
  });
  beforeEach(async () => {
    await c.db.query('DELETE FROM events');
    browser = await launch();
    use(c, browser);
  });
  afterEach(async () => {
    await browser?.close();
  });
  return async (where = 'true') => Number((await c.db.query(`SELECT count(*) AS n FROM events WHERE ${where}`))[0].n);
}
