// The SDK's most important promises in Firefox (headless Firefox ESR driven by geckodriver
// through selenium-webdriver), against the real collector: button presses become rows,
// events survive a reload, the unload beacon is not followed by duplicate sends, and an
// outage loses nothing.
//
// Selenium cannot intercept requests, so failures are injected by the harness's proxy
// between the page and the collector. Nothing here skips: a missing Firefox or geckodriver
// fails with a message saying what to install.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Builder, By } from 'selenium-webdriver';
import firefox from 'selenium-webdriver/firefox.js';
import {
  assertAskedNotResent,
  assertEachSeqOnce,
  collectorSuite,
  eventually,
  freePort,
  leaveWithQueuedEvents,
  musicUrl,
  need,
  outageThenRecovery,
  startProxy,
} from './harness.mjs';

const FIREFOX = process.env.FIREFOX_PATH || '/usr/bin/firefox-esr';
const GECKODRIVER = process.env.GECKODRIVER_PATH || join(process.env.CARGO_HOME || join(homedir(), '.cargo'), 'bin/geckodriver');
// selenium-manager must not try to download a driver or a browser.
process.env.SE_OFFLINE = 'true';

// Keep Firefox's own traffic off the network: only the test's 127.0.0.1 servers are reached.
const PREFS = {
  'app.update.auto': false,
  'app.update.enabled': false,
  'browser.safebrowsing.malware.enabled': false,
  'browser.safebrowsing.phishing.enabled': false,
  'browser.safebrowsing.downloads.enabled': false,
  'browser.safebrowsing.downloads.remote.enabled': false,
  'browser.safebrowsing.provider.google4.updateURL': '',
  'browser.safebrowsing.provider.mozilla.updateURL': '',
  'browser.region.network.url': '',
  'browser.region.update.enabled': false,
  'browser.newtabpage.enabled': false,
  'browser.startup.page': 0,
  'browser.startup.homepage': 'about:blank',
  'datareporting.healthreport.uploadEnabled': false,
  'datareporting.policy.dataSubmissionEnabled': false,
  'extensions.getAddons.cache.enabled': false,
  'extensions.update.enabled': false,
  'geo.provider.network.url': '',
  'media.gmp-manager.url': '',
  'network.captive-portal-service.enabled': false,
  'network.connectivity-service.enabled': false,
  'network.dns.disablePrefetch': true,
  'network.prefetch-next': false,
  'network.proxy.type': 0,
  'network.trr.mode': 5,
  'services.settings.server': 'http://127.0.0.1:9/',
  'toolkit.telemetry.enabled': false,
  'toolkit.telemetry.unified': false,
};

/** Headless Firefox with a fresh profile (kept across the pages of one test). */
async function launchFirefox() {
  need(existsSync(FIREFOX), `Firefox is required at ${FIREFOX}: apt-get update && apt-get install -y firefox-esr (or set FIREFOX_PATH)`);
  need(existsSync(GECKODRIVER), `geckodriver is required at ${GECKODRIVER}: cargo install geckodriver (or set GECKODRIVER_PATH)`);
  const profile = mkdtempSync(join(tmpdir(), 'tracklet-firefox-'));
  const options = new firefox.Options().setBinary(FIREFOX).addArguments('-headless', '-profile', profile);
  for (const [k, v] of Object.entries(PREFS)) options.setPreference(k, v);
  const driver = await new Builder()
    .forBrowser('firefox')
    .setFirefoxOptions(options)
    .setFirefoxService(new firefox.ServiceBuilder(GECKODRIVER))
    .build();
  await driver.manage().setTimeouts({ script: 20000, pageLoad: 20000 });
  return {
    driver,
    async close() {
      await driver.quit().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

let c;
let browser;
const count = collectorSuite((collector, b) => ((c = collector), (browser = b)), launchFirefox);

/** Runs `fn(arg)` in the current page and returns its (awaited) result. */
const run = (fn, arg) => browser.driver.executeScript(fn, arg);
/** Evaluates `window.tracker.<what>` in the current page (a promise is awaited). */
const tracker = (what) => browser.driver.executeScript(`return window.tracker.${what}`);

/** Opens `url` and waits until the page's `window.tracker` has its wasm loaded. */
async function open(url) {
  await browser.driver.get(url);
  await eventually(() => run(() => window.tracker && window.tracker.ready().then(() => true)), 15000, 'the SDK to be ready');
}

const storedEvents = () =>
  run(() =>
    Object.keys(localStorage)
      .filter((k) => k.startsWith('tl1:e:'))
      .flatMap((k) => localStorage.getItem(k).split('\n')).length,
  );

test('Firefox: button presses on the example page become rows in Postgres', async () => {
  await open(musicUrl(c, { maxBatchSize: '3', maxWaitTime: '60000', autocapture: 'false' }));
  assert.equal(await tracker('status().lastError'), null);
  for (const button of ['play[data-song="1"]', 'like[data-song="2"]', 'download[data-song="3"]']) {
    await browser.driver.findElement(By.css(`button.${button}`)).click();
  }
  // The third event fills the batch: it is sent without forceSend().
  await eventually(async () => (await count()) === 3, 15000, 'three rows');
  const rows = await c.db.query('SELECT name, props, context, anonymous_id, session_id FROM events');
  assert.deepEqual(rows.map((r) => r.name).sort(), ['Song Downloaded', 'Song Liked', 'Song Played']);
  const played = rows.find((r) => r.name === 'Song Played');
  assert.deepEqual([played.props.songId, played.props.title], [1, 'Blue in Green']);
  assert.equal(played.context.path, '/music/');
  assert.equal(new Set(rows.map((r) => r.anonymous_id)).size, 1);
  assert.equal(new Set(rows.map((r) => r.session_id)).size, 1);
  await eventually(() => tracker('pendingCount() === 0'), 5000, 'queue to empty');
  assert.match(await browser.driver.findElement(By.id('pending')).getText(), /pending: 0/);
});

test('Firefox: events survive a reload and are sent by forceSend()', async () => {
  // An endpoint where nothing listens: only localStorage can carry the events over.
  const nowhere = `http://127.0.0.1:${await freePort()}`;
  const opts = { maxBatchSize: '100', maxWaitTime: '600000', autocapture: 'false' };
  await open(musicUrl(c, { ...opts, endpoint: nowhere }));
  const pending = await run(() => {
    for (let i = 0; i < 5; i++) window.tracker.track('Song Played', { seq: i });
    return window.tracker.pendingCount();
  });
  assert.equal(pending, 5);
  assert.equal(await storedEvents(), 5, 'every event is in localStorage by the end of the task that tracked it');
  await browser.driver.navigate().refresh();
  await eventually(() => run(() => window.tracker && window.tracker.ready().then(() => window.tracker.status().pending === 5)), 15000, '5 pending after the reload');
  await open(musicUrl(c, opts));
  assert.equal(await tracker('status().pending'), 5);
  assert.equal(await count(), 0, 'nothing reached the collector yet');
  assert.deepEqual(await tracker('forceSend()'), { sent: 5, pending: 0 });
  await assertEachSeqOnce(c.db, 5);
  assert.equal(await storedEvents(), 0, 'acknowledged events leave storage');
});

test('Firefox: the unload beacon delivers, and the next page sends nothing twice', async () => {
  const proxy = await startProxy(c.origin);
  try {
    const opts = { endpoint: proxy.origin, maxBatchSize: '1000', maxWaitTime: '600000', autocapture: 'false' };
    await open(musicUrl(c, opts));
    const beacon = await leaveWithQueuedEvents(run, proxy, c.origin, 200);
    await open(musicUrl(c, { ...opts, maxWaitTime: '1000' }));
    await eventually(() => tracker('pendingCount() === 0'), 15000, 'the queue to empty');
    await assertEachSeqOnce(c.db, 200);
    assertAskedNotResent(proxy, beacon, 200);
  } finally {
    await proxy.close();
  }
});

test('Firefox: a collector answering 503 loses nothing, and the SDK recovers by itself', async () => {
  let failing = true;
  let refused = 0;
  const proxy = await startProxy(c.origin, (r) => (failing && r.path === '/v1/batch' ? (refused++, 503) : 'forward'));
  try {
    await open(musicUrl(c, { endpoint: proxy.origin, maxBatchSize: '5', maxWaitTime: '500', autocapture: 'false' }));
    // No forceSend(): the backoff timer alone delivers once the collector is back.
    await outageThenRecovery(run, count, { attempts: () => refused, recover: () => (failing = false) });
    await assertEachSeqOnce(c.db, 12);
    assert.deepEqual(proxy.answers, { accepted: 12, duplicates: 0 });
  } finally {
    await proxy.close();
  }
});
