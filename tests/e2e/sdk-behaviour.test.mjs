// The SDK's promises in a real browser against the real collector: tabs, outages,
// Retry-After, offline, full storage, autocapture, early calls, privacy signals.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collectorSuite, eventually, musicUrl, outageThenRecovery, sdkReady } from './harness.mjs';

let c;
let browser;
const count = collectorSuite((collector, b) => ((c = collector), (browser = b)));
const QUIET = { maxBatchSize: '1000', maxWaitTime: '600000', autocapture: 'false' };

async function open(params = QUIET, page) {
  page = page || (await browser.context.newPage());
  await page.goto(musicUrl(c, params));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.status().lastError === null);
  return page;
}

/** The collector's answers to a page's batches: {accepted, duplicates} summed. */
function recordAnswers(page) {
  const seen = { accepted: 0, duplicates: 0 };
  page.on('response', async (resp) => {
    if (resp.request().method() === 'POST' && resp.url().includes('/v1/batch') && resp.ok()) {
      const body = await resp.json().catch(() => null);
      if (body) {
        seen.accepted += body.accepted;
        seen.duplicates += body.duplicates;
      }
    }
  });
  return seen;
}

test('two tabs send a shared queue without sending any event twice', async () => {
  const a = await open({ ...QUIET, maxBatchSize: '10' });
  const b = await open({ ...QUIET, maxBatchSize: '10' });
  const seenA = recordAnswers(a);
  const seenB = recordAnswers(b);
  // Both tabs track at once; batches fill and go out while the other tab tracks.
  await Promise.all(
    [a, b].map((p, tab) =>
      p.evaluate(async (tab) => {
        for (let i = 0; i < 40; i++) {
          window.tracker.track('Song Played', { tab, seq: i });
          if (i % 5 === 4) await new Promise((r) => setTimeout(r, 5));
        }
      }, tab),
    ),
  );
  await Promise.all([a, b].map((p) => p.evaluate(() => window.tracker.forceSend())));
  await eventually(async () => (await count()) === 80, 20000, '80 rows');
  await eventually(() => a.evaluate(() => window.tracker.forceSend().then((r) => r.pending === 0)), 20000, 'tab A to see an empty queue');
  assert.equal(seenA.accepted + seenB.accepted, 80, 'every event was accepted once');
  assert.equal(seenA.duplicates + seenB.duplicates, 0, 'no event was sent twice');
});

test('a collector answering 503 loses nothing, and the SDK recovers by itself', async () => {
  const page = await browser.context.newPage();
  let failing = true;
  let attempts = 0;
  await page.route('**/v1/batch**', (route) => {
    if (!failing) return route.continue();
    attempts++;
    return route.fulfill({ status: 503, contentType: 'application/json', body: '{"error":"unavailable","message":"down"}' });
  });
  await open({ maxBatchSize: '5', maxWaitTime: '500', autocapture: 'false' }, page);
  // No forceSend(): the backoff timer alone delivers once the collector is back.
  await outageThenRecovery((fn, arg) => page.evaluate(fn, arg), count, { attempts: () => attempts, recover: () => (failing = false) });
});

test('Retry-After is honoured, even by forceSend()', async () => {
  const page = await browser.context.newPage();
  let limited = true;
  const times = [];
  await page.route('**/v1/batch**', (route) => {
    times.push(Date.now());
    if (!limited) return route.continue();
    limited = false;
    return route.fulfill({
      status: 429,
      headers: { 'Retry-After': '3', 'Content-Type': 'application/json' },
      body: '{"error":"rate_limited","message":"slow down"}',
    });
  });
  await open(QUIET, page);
  await page.evaluate(() => window.tracker.track('Song Played', { seq: 1 }));
  const first = await page.evaluate(() => window.tracker.forceSend());
  assert.deepEqual(first, { sent: 0, pending: 1 });
  const st = await page.evaluate(() => window.tracker.status());
  assert.equal(st.lastError, 'HTTP 429');
  assert.ok(st.nextRetryAt >= times[0] + 2900, 'next retry not before Retry-After');
  const second = await page.evaluate(() => window.tracker.forceSend());
  assert.deepEqual(second, { sent: 0, pending: 1 }, 'forceSend() does not jump Retry-After');
  assert.equal(times.length, 1, 'no request before Retry-After');
  await eventually(async () => (await count()) === 1, 15000, 'the event after Retry-After');
  assert.ok(times[1] - times[0] >= 2900, `second attempt ${times[1] - times[0]} ms after the 429`);
});

test('offline spends no attempts and sends when the browser is back online', async () => {
  const page = await open({ maxBatchSize: '1000', maxWaitTime: '300', autocapture: 'false' });
  await page.route('**/v1/batch**', (route) => route.abort('internetdisconnected'));
  await browser.context.setOffline(true);
  await page.evaluate(() => {
    for (let i = 0; i < 3; i++) window.tracker.track('Song Played', { seq: i });
  });
  assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 0, pending: 3 });
  const st = await page.evaluate(() => window.tracker.status());
  assert.equal(st.online, false);
  assert.equal(st.nextRetryAt, null, 'being offline is not a failure');
  await page.unroute('**/v1/batch**');
  await browser.context.setOffline(false);
  await eventually(async () => (await count()) === 3, 15000, 'delivery after the online event');
});

test('with localStorage full, events are kept in memory and still delivered', async () => {
  const page = await open();
  const filled = await page.evaluate(() => {
    const chunk = 'x'.repeat(256 * 1024);
    let i = 0;
    try {
      for (; i < 200; i++) localStorage.setItem('junk' + i, chunk);
    } catch (e) {
      return e.name;
    }
    return 'never full';
  });
  assert.equal(filled, 'QuotaExceededError');
  const ok = await page.evaluate(() => {
    for (let i = 0; i < 4; i++) window.tracker.track('Song Played', { seq: i, pad: 'y'.repeat(2000) });
    return window.tracker.pendingCount();
  });
  assert.equal(ok, 4);
  assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 4, pending: 0 });
  assert.equal(await count(), 4);
});

test('autocapture: page views (also SPA), clicks without form values, scroll depth', async () => {
  const page = await open({ maxBatchSize: '1000', maxWaitTime: '600000' });
  await page.evaluate(() => {
    const tall = document.createElement('div');
    tall.style.height = '5000px';
    document.body.append(tall);
    const field = document.createElement('input');
    field.id = 'secret-field';
    document.body.prepend(field);
  });
  await page.fill('#secret-field', 'hunter2-secret');
  await page.click('#secret-field');
  await page.fill('#search', 'ignored-search');
  await page.click('#search');
  await page.click('button.play[data-song="2"]');
  await page.evaluate(() => history.pushState({}, '', '/music/charts'));
  await page.evaluate(() => history.replaceState({}, '', '/music/charts'));
  await page.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
  await eventually(() => page.evaluate(() => window.tracker.pendingCount() >= 9), 5000, 'scroll events');
  await page.evaluate(() => window.tracker.forceSend());
  const rows = await c.db.query('SELECT name, props FROM events ORDER BY ts, id');
  const views = rows.filter((r) => r.name === 'page_view').map((r) => r.props.path);
  assert.deepEqual(views, ['/music/', '/music/charts'], 'once per path, SPA navigation included');
  const clicks = rows.filter((r) => r.name === 'click').map((r) => r.props);
  const play = clicks.find((p) => p.text === 'play');
  assert.ok(play, 'the button click');
  assert.equal(play.tag, 'button');
  assert.deepEqual(play.classes, ['song-action', 'play']);
  assert.match(play.path, /button/);
  const field = clicks.find((p) => p.id === 'secret-field');
  assert.ok(field, 'the input click');
  assert.equal(field.tag, 'input');
  assert.equal(field.text, undefined);
  assert.ok(!clicks.some((p) => p.id === 'search'), 'nothing inside [data-tracklet-ignore]');
  assert.ok(!JSON.stringify(rows).includes('hunter2-secret'), 'no input value anywhere');
  const depths = rows.filter((r) => r.name === 'scroll').map((r) => r.props.depth);
  assert.deepEqual(depths.sort((x, y) => x - y), [25, 50, 75, 100]);
  // Still once per page view: scrolling again adds nothing.
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await page.evaluate(() => window.tracker.pendingCount()), 0);
});

test('calls made before the wasm is ready are kept and replayed in order', async () => {
  const page = await browser.context.newPage();
  // Hold the wasm back so the calls certainly come first.
  let release;
  const held = new Promise((r) => (release = r));
  await page.route('**/tracklet.wasm', async (route) => {
    await held;
    await route.continue();
  });
  await page.goto(`${c.origin}/index.html`);
  await page.addScriptTag({ url: '/dist/tracklet.js' });
  const early = await page.evaluate(
    ({ endpoint, apiKey }) => {
      const t = window.tracklet.init({ endpoint, apiKey, autocapture: false, maxWaitTime: 600000 });
      window.t = t;
      for (let i = 0; i < 3; i++) t.track('Early', { seq: i });
      return { pending: t.pendingCount(), stored: Object.keys(localStorage).filter((k) => k.startsWith('tl1:p:')).length };
    },
    { endpoint: c.origin, apiKey: c.key },
  );
  assert.deepEqual(early, { pending: 3, stored: 3 }, 'kept in storage before the wasm is ready');
  release();
  assert.deepEqual(await page.evaluate(() => window.t.forceSend()), { sent: 3, pending: 0 });
  const seqs = (await c.db.query("SELECT props->>'seq' AS s FROM events WHERE name = 'Early' ORDER BY ts, id")).map((r) => r.s);
  assert.deepEqual(seqs, ['0', '1', '2']);
});

test('Global Privacy Control turns tracking off; bad input never throws; one tracker per page', async () => {
  const page = await browser.context.newPage();
  await page.addInitScript(() => {
    Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', { get: () => true });
    window.pageErrors = [];
    addEventListener('error', (e) => window.pageErrors.push(String(e.message)));
    addEventListener('unhandledrejection', (e) => window.pageErrors.push(String(e.reason)));
  });
  await page.goto(`${c.origin}/index.html`);
  await page.addScriptTag({ url: '/dist/tracklet.js' });
  const r = await page.evaluate(
    async ({ endpoint, apiKey }) => {
      const t = window.tracklet.init({ endpoint, apiKey, autocapture: false });
      t.track('Song Played', { seq: 1 });
      const off = { pending: t.pendingCount(), sent: (await t.forceSend()).sent };
      // Options that cannot be read give an inert tracker, never an exception.
      const odd = window.tracklet.init({
        endpoint,
        apiKey,
        respectPrivacySignals: false,
        get autocapture() {
          throw new Error('unreadable option');
        },
      });
      odd.track('never sent');
      const t2 = window.tracklet.init({ endpoint, apiKey, autocapture: false, respectPrivacySignals: false, alwaysKeep: 'ok' });
      await t2.ready();
      const cyclic = { a: 1 };
      cyclic.self = cyclic;
      const threw = [];
      for (const args of [[], [null], [''], ['x'.repeat(500)], ['ok', cyclic], ['ok', 10n], ['big', { s: 'z'.repeat(100000) }]]) {
        try {
          t2.track(...args);
        } catch (e) {
          threw.push(String(e));
        }
      }
      const sent = await t2.forceSend();
      await new Promise((r) => setTimeout(r, 300));
      // One tracker per page: calling init() again hands back the running one.
      const again = window.tracklet.init({ endpoint, apiKey, autocapture: false, respectPrivacySignals: false });
      return { off, threw, sent, same: again === t2, pageErrors: window.pageErrors };
    },
    { endpoint: c.origin, apiKey: c.key },
  );
  assert.deepEqual(r.off, { pending: 0, sent: 0 });
  assert.deepEqual(r.threw, []);
  assert.ok(r.same, 'a second init() returns the running tracker');
  assert.deepEqual(r.pageErrors, [], 'nothing reached the page\'s error handlers');
  assert.equal(r.sent.pending, 0);
  const names = (await c.db.query('SELECT name, props FROM events ORDER BY ts')).map((x) => x.name);
  // No name, null, '' and a 500-character name are refused, as is a 100 KB event; a cyclic
  // or BigInt props object is sent without props.
  assert.deepEqual(names, ['ok', 'ok']);
});

test('identify(), reset() and a persisted optOut()', async () => {
  const page = await open();
  await page.evaluate(() => {
    window.tracker.track('Before');
    window.tracker.identify('user-42', { plan: 'pro' });
    window.tracker.track('After');
  });
  await page.evaluate(() => window.tracker.forceSend());
  const rows = await c.db.query('SELECT name, user_id, anonymous_id, props FROM events ORDER BY ts, id');
  assert.deepEqual(rows.map((r) => [r.name, r.user_id]), [['Before', null], ['identify', 'user-42'], ['After', 'user-42']]);
  assert.equal(rows[1].props.plan, 'pro');
  const anon = rows[0].anonymous_id;
  await page.evaluate(() => {
    window.tracker.reset();
    window.tracker.track('Logged out');
  });
  await page.evaluate(() => window.tracker.forceSend());
  const out = (await c.db.query("SELECT user_id, anonymous_id FROM events WHERE name = 'Logged out'"))[0];
  assert.equal(out.user_id, null);
  assert.notEqual(out.anonymous_id, anon, 'a new anonymous id');
  // Opting out discards the queue, stops tracking, and is remembered across a reload.
  await page.evaluate(() => {
    window.tracker.track('Queued then discarded');
    window.tracker.optOut();
    window.tracker.track('Not tracked');
  });
  assert.equal(await page.evaluate(() => window.tracker.pendingCount()), 0);
  await page.reload();
  await sdkReady(page);
  assert.equal(await page.evaluate(() => (window.tracker.track('Still not tracked'), window.tracker.status().optedOut)), true);
  assert.equal(await page.evaluate(() => window.tracker.pendingCount()), 0);
  await page.evaluate(() => {
    window.tracker.optIn();
    window.tracker.track('Back');
  });
  await page.evaluate(() => window.tracker.forceSend());
  const names = (await c.db.query('SELECT name FROM events ORDER BY ts, id')).map((r) => r.name);
  assert.deepEqual(names, ['Before', 'identify', 'After', 'Logged out', 'Back']);
});

test('sampling, alwaysKeep, and events the collector rejects are dropped and counted', async () => {
  const page = await browser.context.newPage();
  await page.goto(`${c.origin}/index.html`);
  await page.addScriptTag({ url: '/dist/tracklet.js' });
  const r = await page.evaluate(
    async ({ endpoint, apiKey }) => {
      const t = window.tracklet.init({
        endpoint,
        apiKey,
        autocapture: false,
        sampling: { Noisy: 0, Kept: 0, Half: 0.5 },
        alwaysKeep: ['Kept'],
      });
      await t.ready();
      for (let i = 0; i < 5; i++) t.track('Noisy', { i });
      for (let i = 0; i < 3; i++) t.track('Kept', { i });
      for (let i = 0; i < 400; i++) t.track('Half', { i });
      // Nested deeper than the collector allows: it lists this event as rejected.
      let deep = { leaf: true };
      for (let i = 0; i < 40; i++) deep = { deep };
      t.track('Too deep', deep);
      t.track('Fine');
      const pending = t.pendingCount();
      const sent = await t.forceSend();
      return { pending, sent, status: t.status() };
    },
    { endpoint: c.origin, apiKey: c.key },
  );
  const byName = Object.fromEntries((await c.db.query('SELECT name, count(*)::int AS n FROM events GROUP BY name')).map((x) => [x.name, x.n]));
  assert.equal(byName.Noisy, undefined, 'rate 0 keeps nothing');
  assert.equal(byName.Kept, 3, 'alwaysKeep beats sampling');
  assert.ok(byName.Half > 140 && byName.Half < 260, `about half kept (${byName.Half})`);
  assert.equal(byName['Too deep'], undefined);
  assert.equal(byName.Fine, 1);
  assert.equal(r.sent.pending, 0, 'the rejected event left the queue');
  assert.equal(r.status.rejected, 1);
  assert.match(r.status.lastError, /1 events rejected/);
});

test('a failure inside a callback the browser calls into the wasm never reaches the page', async () => {
  const page = await browser.context.newPage();
  await page.addInitScript(() => {
    window.pageErrors = [];
    addEventListener('error', (e) => window.pageErrors.push(String(e.message)));
    addEventListener('unhandledrejection', (e) => window.pageErrors.push(String(e.reason)));
    // A broken Web Locks: it calls the SDK's callback twice, the second time from a timer
    // of its own, where whatever the callback throws would reach the page's handlers.
    LockManager.prototype.request = function (name, options, cb) {
      return new Promise((resolve) => {
        setTimeout(() => Promise.resolve(cb({ name, mode: 'exclusive' })).then(resolve), 0);
        setTimeout(() => cb({ name, mode: 'exclusive' }), 5);
      });
    };
  });
  await open(QUIET, page);
  await page.evaluate(() => {
    for (let i = 0; i < 3; i++) window.tracker.track('Song Played', { seq: i });
  });
  assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 3, pending: 0 });
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(await page.evaluate(() => window.pageErrors), [], "nothing reached the page's error handlers");
  assert.equal(await count("name = 'Song Played'"), 3);
});
