// Leaving a page with events queued: the unload beacon delivers them, and the next page asks
// the collector which batches arrived (POST /v1/batch/status) instead of sending them again.
// When it cannot ask, it resends, and still nothing is lost or stored twice.
//
// The SDK's endpoint is a proxy in front of the collector (harness startProxy), which sees
// every request, the beacon included, and the collector's answers.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  assertAskedNotResent,
  assertEachSeqOnce,
  collectorSuite,
  eventually,
  leaveWithQueuedEvents,
  musicUrl,
  sdkReady,
  startProxy,
} from './harness.mjs';

let c;
let browser;
collectorSuite((collector, b) => ((c = collector), (browser = b)));
const EVENTS = 200;

/**
 * Tracks EVENTS events and navigates away in the same task, waits for the unload beacon to be
 * answered, then comes back to a page with the SDK (its queue not due for 600 s, so only the
 * answer to the status question or a resend can empty it) and waits for an empty queue.
 * `statusRoute` (optional) handles the page's POST /v1/batch/status requests.
 */
async function leaveAndComeBack(statusRoute) {
  const page = await browser.context.newPage();
  const proxy = await startProxy(c.origin);
  const routed = [];
  if (statusRoute) {
    await page.route('**/v1/batch/status**', (route) => {
      routed.push(route.request().url());
      return statusRoute(route);
    });
  }
  try {
    const opts = { endpoint: proxy.origin, maxBatchSize: '1000', maxWaitTime: '600000', autocapture: 'false' };
    await page.goto(musicUrl(c, opts));
    await sdkReady(page);
    const beacon = await leaveWithQueuedEvents((fn, arg) => page.evaluate(fn, arg), proxy, c.origin, EVENTS);
    await page.goto(musicUrl(c, { ...opts, maxWaitTime: '1000' }));
    await sdkReady(page);
    await eventually(() => page.evaluate(() => window.tracker.pendingCount() === 0), 15000, 'the queue to empty');
    await assertEachSeqOnce(c.db, EVENTS);
    return { proxy, beacon, routed };
  } finally {
    await proxy.close();
  }
}

test('(a) the next page asks which batches arrived and sends nothing twice', async () => {
  const { proxy, beacon } = await leaveAndComeBack();
  assertAskedNotResent(proxy, beacon, EVENTS);
});

const UNAVAILABLE = { status: 503, contentType: 'application/json', body: '{"error":"unavailable","message":"down"}' };

for (const [label, statusRoute] of [
  ['(b) the status question answered 503', (route) => route.fulfill(UNAVAILABLE)],
  ['(c) the status endpoint unreachable', (route) => route.abort()],
]) {
  test(`${label}: the events are resent, none lost, none stored twice`, async () => {
    const { proxy, beacon, routed } = await leaveAndComeBack(statusRoute);
    assert.ok(routed.length >= 1, 'the page asked POST /v1/batch/status');
    assert.equal(proxy.answers.accepted, EVENTS, 'every event accepted once');
    assert.equal(proxy.answers.duplicates, beacon.events, 'the beacon\'s events were sent again, and dropped as duplicates');
  });
}

/**
 * Opens the music page behind a new proxy (a new origin, so a new connection: Chromium
 * silently retries a request whose reused connection closes without an answer) that
 * forwards the first batch to the collector and loses its answer.
 */
async function pageLosingFirstAnswer(page) {
  let batches = 0;
  const proxy = await startProxy(c.origin, (r) => (r.path === '/v1/batch' && ++batches === 1 ? 'lose-answer' : 'forward'));
  await page.goto(musicUrl(c, { endpoint: proxy.origin, maxBatchSize: '1000', maxWaitTime: '600000', autocapture: 'false' }));
  await sdkReady(page);
  return proxy;
}

test('(d) a batch whose answer was lost is asked about, here and on the next page, not sent again', async () => {
  // The collector commits the batch but the page sees a network error, as when the browser
  // cuts a page's fetch off while it navigates away: the events may have arrived, so they
  // are held and the collector is asked before anything is resent.
  const page = await browser.context.newPage();
  let proxy = await pageLosingFirstAnswer(page);
  try {
    const sent = await page.evaluate((n) => {
      for (let i = 0; i < n; i++) window.tracker.track('Song Played', { seq: i });
      return window.tracker.forceSend();
    }, EVENTS);
    assert.deepEqual(sent, { sent: 0, pending: EVENTS }, 'the answer was lost: nothing counted as sent');
    assert.equal((await page.evaluate(() => window.tracker.status())).lastError, 'network error');
    const lost = proxy.requests.find((r) => r.path === '/v1/batch');
    assert.equal(lost.status, '200, answer lost');
    // This page asks once the request is a second old, and forgets the events.
    await eventually(() => page.evaluate(() => window.tracker.pendingCount() === 0), 15000, 'the queue to empty');
    assertAskedNotResent(proxy, lost.body, EVENTS);
    await assertEachSeqOnce(c.db, EVENTS);
  } finally {
    await proxy.close();
  }

  // The same, but the page goes away before it could ask: the next page asks.
  await c.db.query('DELETE FROM events');
  proxy = await pageLosingFirstAnswer(page);
  try {
    await page.evaluate((n) => {
      for (let i = 0; i < n; i++) window.tracker.track('Song Played', { seq: i + 1000 });
      window.tracker.forceSend().then(() => location.reload());
    }, EVENTS);
    const lost = await eventually(() => proxy.requests.find((r) => r.path === '/v1/batch'), 15000, 'the batch');
    await eventually(() => proxy.statusQueries().length > 0, 15000, 'the next page to ask');
    await eventually(() => page.evaluate(() => window.tracker?.pendingCount() === 0), 15000, 'the queue to empty');
    assert.equal(lost.status, '200, answer lost');
    assertAskedNotResent(proxy, lost.body, EVENTS);
    const [{ n }] = await c.db.query("SELECT count(DISTINCT id)::int AS n FROM events WHERE (props->>'seq')::int >= 1000");
    assert.equal(n, EVENTS, 'every event stored once');
  } finally {
    await proxy.close();
  }
});
