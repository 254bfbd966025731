// Helpers for the packaging tests: a stub collector, a static file server, headless
// Chromium, cached consumer installs and polling.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
// The browser flags of the end-to-end tests.
import { CHROMIUM_ARGS } from '../../tests/e2e/harness.mjs';

export const here = dirname(fileURLToPath(import.meta.url));
export const root = join(here, '..', '..');
export const work = join(here, '.work');

export function need(cond, msg) {
  if (!cond) throw new Error(msg);
}

export function sha(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}

/** Runs a command; throws with its output when it fails. */
export function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  if (r.error) throw new Error(`cannot run ${cmd}: ${r.error.message}`);
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} (in ${opts.cwd || '.'}) failed with ${r.status}:\n${r.stdout}\n${r.stderr}`.trim());
  }
  return r.stdout;
}

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(`http://127.0.0.1:${server.address().port}`));
  });
}

/** A gate: `wait()` resolves once `open()` is called (open by default). */
function gate(open = true) {
  let release;
  let p = open ? Promise.resolve() : new Promise((r) => (release = r));
  return {
    close() {
      p = new Promise((r) => (release = r));
    },
    open() {
      release?.();
      p = Promise.resolve();
    },
    wait: () => p,
  };
}

/**
 * A stub collector: POST /v1/batch answers {"accepted": n, "duplicates": 0, "rejected": []}
 * with CORS headers. `events` are every event received (gzip bodies decoded); `hold()` makes
 * answers wait until `release()`.
 */
export async function stubCollector() {
  const events = [];
  const batches = [];
  const answers = gate();
  let waiting = 0;
  const server = createServer((req, res) => {
    const cors = { 'Access-Control-Allow-Origin': '*', 'Access-Control-Allow-Headers': '*', 'Access-Control-Allow-Methods': 'POST, OPTIONS' };
    if (req.method === 'OPTIONS') return res.writeHead(204, cors).end();
    const url = new URL(req.url, 'http://x');
    if (req.method !== 'POST' || url.pathname !== '/v1/batch') return res.writeHead(404, cors).end();
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      let body = Buffer.concat(chunks);
      let batch;
      try {
        if (body[0] === 0x1f && body[1] === 0x8b) body = gunzipSync(body);
        batch = JSON.parse(body.toString('utf8'));
        need(Array.isArray(batch.events) && typeof batch.sent_at === 'number', 'not a batch');
      } catch (e) {
        res.writeHead(400, { ...cors, 'Content-Type': 'application/json' }).end(JSON.stringify({ error: 'malformed', message: String(e) }));
        return;
      }
      batches.push({ key: url.searchParams.get('key'), batch });
      waiting++;
      await answers.wait();
      waiting--;
      events.push(...batch.events.map((e) => ({ ...e, key: url.searchParams.get('key') })));
      res
        .writeHead(200, { ...cors, 'Content-Type': 'application/json' })
        .end(JSON.stringify({ accepted: batch.events.length, duplicates: 0, rejected: [] }));
    });
  });
  const origin = await listen(server);
  return {
    origin,
    events,
    batches,
    hold: () => answers.close(),
    release: () => answers.open(),
    held: () => waiting,
    names: () => events.map((e) => e.name),
    close: () => new Promise((r) => (answers.open(), server.close(r), server.closeAllConnections())),
  };
}

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.svg': 'image/svg+xml',
};

/**
 * Serves `dir`. `fallback(path)` names the file for paths that are not files (SPA routes);
 * `gates` holds the answer for a path until `release(path)`. `requests` lists every path asked for.
 */
export async function staticServer(dir, { fallback, gated = [] } = {}) {
  const gates = new Map(gated.map((p) => [p, gate(false)]));
  const requests = [];
  const server = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    requests.push(path);
    if (path === '/favicon.ico') return res.writeHead(204).end();
    let file = join(dir, normalize(path).replace(/^(\.\.[/\\])+/, ''));
    if (existsSync(file) && statSync(file).isDirectory()) file = join(file, 'index.html');
    if (!existsSync(file) && fallback) {
      const f = fallback(path);
      if (f) file = join(dir, f);
    }
    if (!existsSync(file)) return res.writeHead(404).end('not found');
    await gates.get(path)?.wait();
    res.writeHead(200, { 'Content-Type': TYPES[extname(file)] || 'application/octet-stream', 'Cache-Control': 'no-store' });
    res.end(readFileSync(file));
  });
  const origin = await listen(server);
  return {
    origin,
    requests,
    release: (path) => gates.get(path).open(),
    close: () => new Promise((r) => (gates.forEach((g) => g.open()), server.close(r), server.closeAllConnections())),
  };
}

/** Headless Chromium with a fresh profile; `errors` collects page errors and console errors. */
export async function launchBrowser() {
  const exe = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  need(existsSync(exe), `Chromium is required at ${exe}: apt-get install -y chromium (or set CHROMIUM_PATH)`);
  const { chromium } = await import('playwright-core');
  const profile = mkdtempSync(join(tmpdir(), 'tracklet-pack-chromium-'));
  const context = await chromium.launchPersistentContext(profile, { executablePath: exe, headless: true, args: CHROMIUM_ARGS });
  const errors = [];
  return {
    errors,
    async page() {
      const page = await context.newPage();
      page.on('pageerror', (e) => errors.push('pageerror: ' + e.message));
      page.on('console', (m) => {
        // A failed request is reported below, with its URL.
        if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push('console.error: ' + m.text());
      });
      page.on('response', (r) => r.status() >= 400 && errors.push(`HTTP ${r.status()} for ${r.url()}`));
      page.on('requestfailed', (r) => errors.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));
      return page;
    },
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Polls `fn` until it returns a truthy value; throws (saying what) after `ms`. */
export async function eventually(fn, what, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${typeof what === 'function' ? what() : what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Makes `dir` a consumer project with `pkg` as its package.json and installs it, unless the
 * same package.json was installed there before (so node_modules stays cached across runs).
 */
export function installConsumer(dir, pkg, log) {
  mkdirSync(dir, { recursive: true });
  const text = JSON.stringify(pkg, null, 2) + '\n';
  const stampFile = join(dir, 'node_modules', '.tracklet-stamp');
  const stamp = sha(text + process.version);
  if (existsSync(stampFile) && readFileSync(stampFile, 'utf8') === stamp) return false;
  writeFileSync(join(dir, 'package.json'), text);
  log(`npm install in ${dir.slice(root.length + 1)}`);
  sh('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: dir });
  writeFileSync(stampFile, stamp);
  return true;
}

