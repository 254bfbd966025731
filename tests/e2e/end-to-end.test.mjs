// The whole path once, for real: the music example page in headless Chromium, the
// script-tag SDK, the collector binary, rows in Postgres.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collectorSuite, eventually, musicUrl, freePort, sdkReady } from './harness.mjs';

let c;
let browser;
// A fresh profile (empty localStorage) and an empty events table for each test.
const count = collectorSuite((collector, b) => ((c = collector), (browser = b)));

test('button presses on the example page become rows in Postgres', async () => {
  const page = await browser.context.newPage();
  await page.goto(musicUrl(c, { maxBatchSize: '3', maxWaitTime: '60000', autocapture: 'false' }));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.status().lastError === null);
  await page.click('button.play[data-song="1"]');
  await page.click('button.like[data-song="2"]');
  await page.click('button.download[data-song="3"]');
  // The third event fills the batch: it is sent without forceSend().
  await eventually(async () => (await count()) === 3, 15000, 'three rows');
  const rows = await c.db.query('SELECT name, props, context, anonymous_id, session_id, sent_at, ts FROM events ORDER BY ts, name');
  assert.deepEqual(rows.map((r) => r.name).sort(), ['Song Downloaded', 'Song Liked', 'Song Played']);
  const played = rows.find((r) => r.name === 'Song Played');
  assert.equal(played.props.songId, 1);
  assert.equal(played.props.title, 'Blue in Green');
  assert.equal(played.context.path, '/music/');
  assert.ok(played.anonymous_id.length >= 32);
  assert.equal(new Set(rows.map((r) => r.anonymous_id)).size, 1);
  assert.equal(new Set(rows.map((r) => r.session_id)).size, 1);
  await eventually(() => page.evaluate(() => window.tracker.pendingCount() === 0), 5000, 'queue to empty');
  assert.match(await page.textContent('#pending'), /pending: 0/);
  await page.close();
});

test('events survive a reload and are sent by forceSend()', async () => {
  const page = await browser.context.newPage();
  // First with an endpoint where nothing listens: no request (fetch or unload beacon) can
  // deliver, so only localStorage can carry the events over the reload.
  const nowhere = `http://127.0.0.1:${await freePort()}`;
  const opts = { maxBatchSize: '100', maxWaitTime: '600000', autocapture: 'false' };
  await page.goto(musicUrl(c, { ...opts, endpoint: nowhere }));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.pendingCount() === 0);
  await page.evaluate(() => {
    for (let i = 0; i < 5; i++) window.tracker.track('Song Played', { seq: i });
  });
  assert.equal(await page.evaluate(() => window.tracker.pendingCount()), 5);
  const stored = await page.evaluate(() =>
    Object.keys(localStorage)
      .filter((k) => k.startsWith('tl1:e:'))
      .flatMap((k) => localStorage.getItem(k).split('\n')).length,
  );
  assert.equal(stored, 5, 'every event is in localStorage by the end of the task that tracked it');
  await page.reload();
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.status().pending === 5);
  // Now with the real collector.
  await page.goto(musicUrl(c, opts));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.status().pending === 5);
  assert.equal(await count(), 0, 'nothing reached the collector yet');
  const r = await page.evaluate(() => window.tracker.forceSend());
  assert.deepEqual(r, { sent: 5, pending: 0 });
  assert.equal(await count("name = 'Song Played'"), 5);
  const seqs = (await c.db.query("SELECT props->>'seq' AS s FROM events ORDER BY s")).map((x) => Number(x.s));
  assert.deepEqual(seqs, [0, 1, 2, 3, 4]);
  assert.equal(
    await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('tl1:e:')).length),
    0,
    'acknowledged events leave storage',
  );
  await page.close();
});

test('the unload beacon delivers at navigation, and the later resend stores nothing twice', async () => {
  const page = await browser.context.newPage();
  await page.goto(musicUrl(c, { maxBatchSize: '100', maxWaitTime: '600000', autocapture: 'false' }));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.pendingCount() === 0);
  // Track and leave in the same task, like a click handler that follows a link.
  await page.evaluate((origin) => {
    for (let i = 0; i < 20; i++) window.tracker.track('Song Played', { seq: i });
    location.assign(origin + '/index.html');
  }, c.origin);
  await eventually(async () => (await count()) === 20, 15000, 'the beacon to arrive');
  // Back on the page the events are still stored (a beacon is never acknowledged) ...
  await page.goto(musicUrl(c, { maxBatchSize: '100', maxWaitTime: '600000', autocapture: 'false' }));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.status().pending === 20);
  // ... and sending them again stores nothing twice.
  assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 20, pending: 0 });
  assert.equal(await count(), 20);
  await page.close();
});

test('clearEvents() empties the queue and reports how many it removed', async () => {
  const page = await browser.context.newPage();
  await page.goto(musicUrl(c, { maxBatchSize: '100', maxWaitTime: '600000', autocapture: 'false' }));
  await sdkReady(page);
  await page.waitForFunction(() => window.tracker && window.tracker.status().pending === 0);
  await page.click('button.share[data-song="4"]');
  await page.click('button.share[data-song="3"]');
  assert.equal(await page.evaluate(() => window.tracker.pendingCount()), 2);
  await page.click('#clear-events');
  assert.equal(await page.evaluate(() => window.tracker.pendingCount()), 0);
  assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 0, pending: 0 });
  assert.equal(await count(), 0);
  await page.close();
});
