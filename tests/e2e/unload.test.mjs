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
