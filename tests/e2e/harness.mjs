// End-to-end test harness: the real collector binary on a fresh Postgres database, the
// built SDK and example pages served by that collector, and headless Chromium.
//
// Nothing here skips: a missing browser, collector binary or Postgres fails the test with
// a message saying what to install.
import { spawn, execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
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

function need(cond, msg) {
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

/**
 * Starts the real collector on a fresh database, serving the examples and the SDK build
 * (npm/dist as /dist/) from the same origin. Returns {origin, key, db, stop()}.
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
    log: () => log,
    async stop() {
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
      await db.drop();
      rmSync(site, { recursive: true, force: true });
    },
  };
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

/** The music page with the SDK pointed at the collector. */
export function musicUrl(c, params = {}) {
  const q = new URLSearchParams({ endpoint: c.origin, apiKey: c.key, ...params });
  return `${c.origin}/music/?${q}`;
}

/**
 * The hooks every browser test file uses: one collector (and database) per file, and for
 * each test an empty `events` table and a fresh browser profile. `use(collector, browser)`
 * receives them; `count(where)` counts rows.
 */
export function collectorSuite(use) {
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
    browser = await launchBrowser();
    use(c, browser);
  });
  afterEach(async () => {
    await browser?.close();
  });
  return async (where = 'true') => Number((await c.db.query(`SELECT count(*) AS n FROM events WHERE ${where}`))[0].n);
}
