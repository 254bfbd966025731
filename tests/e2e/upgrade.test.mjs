// Upgrading the SDK loses nothing: events the previous release (0.1.0, tests/e2e/fixtures/)
// left in localStorage are sent by the new build, each exactly once, and the events the old
// build had already delivered (its gone-lists, `tl1:a:`) are not sent again.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assertEachSeqOnce, collectorSuite, eventually, freePort, startProxy, storedKeys } from './harness.mjs';

let c;
let browser;
const count = collectorSuite((collector, b) => ((c = collector), (browser = b)));

/** Loads a script-tag build (`/old/` or `/dist/`) into `page` on the collector's origin and
 * starts it as `window.t`. */
async function loadBuild(page, dir, options) {
  await page.goto(`${c.origin}/index.html`);
  await page.addScriptTag({ url: `/${dir}/tracklet.js` });
  await page.evaluate(async (options) => {
    window.t = window.tracklet.init({ autocapture: false, maxWaitTime: 600000, ...options });
    await window.t.ready();
  }, options);
}

/** Tracks seq `from`..`to - 1` in `tasks` tasks (one storage record each). `pad` makes each
 * event about 20 KB of incompressible text, so that a batch holds only a few of them. */
function trackInTasks(page, from, to, tasks, pad = false) {
  return page.evaluate(
    async ({ from, to, tasks, pad }) => {
      const per = Math.ceil((to - from) / tasks);
      for (let i = from; i < to; i++) {
        const props = { seq: i };
        if (pad) {
          const bytes = crypto.getRandomValues(new Uint8Array(15000));
          props.pad = btoa(String.fromCharCode(...bytes));
        }
        window.t.track('Upgraded', props);
        if ((i - from) % per === per - 1) await new Promise((r) => setTimeout(r, 20));
      }
      return window.t.pendingCount();
    },
    { from, to, tasks, pad },
  );
}

test('events queued by the previous release are sent once by the new build', async () => {
  const page = await browser.context.newPage();
  const proxy = await startProxy(c.origin);
  try {
    // 1. The old build delivers part of one task's record: the proxy lets its first batch
    //    through and cuts every later request, so the record gets a gone-list.
    let batches = 0;
    proxy.decide = (r) => (r.path === '/v1/batch' && ++batches === 1 ? 'forward' : 'reset');
    await loadBuild(page, 'old', { endpoint: proxy.origin, apiKey: c.key, maxBatchSize: 1000 });
    assert.equal(await trackInTasks(page, 0, 10, 1, true), 10);
    await page.evaluate(() => window.t.forceSend());
    const early = await count();
    assert.ok(early >= 1 && early < 10, `the old build delivered part of the record (${early} of 10 rows)`);
    assert.equal(proxy.answers.accepted, early);
    assert.equal((await storedKeys(page, 'tl1:a:')).length, 1, 'the old build wrote a gone-list');

    // 2. More events in several tasks, and a reload, all with the old build and no collector
    //    (the proxy cuts every request, the unload beacon included).
    assert.equal(await trackInTasks(page, 10, 20, 3), 20 - early);
    const nowhere = `http://127.0.0.1:${await freePort()}`;
    await loadBuild(page, 'old', { endpoint: nowhere, apiKey: c.key, maxBatchSize: 1000 });
    assert.equal(await page.evaluate(() => window.t.pendingCount()), 20 - early, 'the old build restored its queue');
    assert.equal(await trackInTasks(page, 20, 30, 2), 30 - early);
    const records = await storedKeys(page, 'tl1:e:');
    assert.ok(records.length >= 6, `several stored records (${records.length})`);
    assert.equal(await count(), early, 'nothing else reached the collector');

    // 3. The new build on the same origin, pointed at the collector (through the proxy).
    proxy.decide = () => 'forward';
    await loadBuild(page, 'dist', { endpoint: proxy.origin, apiKey: c.key, maxBatchSize: 100 });
    assert.equal(await page.evaluate(() => window.t.pendingCount()), 30 - early, 'the new build read the old queue');
    await page.evaluate(() => window.t.forceSend());
    await eventually(() => page.evaluate(() => window.t.pendingCount() === 0), 15000, 'an empty queue');

    await assertEachSeqOnce(c.db, 30);
    assert.equal(proxy.answers.accepted, 30);
    assert.equal(proxy.answers.duplicates, 0, 'the new build resent none of the events the old build had delivered');
    assert.deepEqual(await storedKeys(page, 'tl1:e:'), [], 'no event record left in storage');
    assert.deepEqual(await storedKeys(page, 'tl1:a:'), [], 'no gone-list left in storage');
  } finally {
    await proxy.close();
    await page.close();
  }
});
