// The dashboard page (GET /dashboard) in headless Chromium against the real collector binary
// on a fresh Postgres database: every headline figure and top list equals the stats API's
// answer for the same range and filters; a write key or an unknown key is refused.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { root, need, freePort, freshDatabase, launchBrowser } from './harness.mjs';

const BIN = process.env.TRACKLET_COLLECTOR_BIN || join(root, 'target/debug/tracklet-collector');
const CHROME_WINDOWS =
  'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36';
const SAFARI_IPHONE =
  'Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1';
const BLOG = 'https://blog.example';
const METRICS = ['visitors', 'sessions', 'pageviews', 'events', 'bounce_rate', 'avg_session_seconds'];
const LISTS = {
  pages: ['page', 'visitors'],
  entry_pages: ['entry_page', 'visitors'],
  exit_pages: ['exit_page', 'visitors'],
  referrers: ['referrer', 'visitors'],
  utm_sources: ['utm_source', 'visitors'],
  utm_mediums: ['utm_medium', 'visitors'],
  utm_campaigns: ['utm_campaign', 'visitors'],
  browsers: ['browser', 'visitors'],
  os: ['os', 'visitors'],
  devices: ['device', 'visitors'],
  countries: ['country', 'visitors'],
  events: ['event', 'events'],
};

let db;
let proc;
let origin;
let projects;
let browser;
let log = '';

function addProject(name, siteOrigin) {
  return JSON.parse(
    execFileSync(BIN, ['--database-url', db.url, 'projects', 'add', '--name', name, '--origin', siteOrigin], {
      encoding: 'utf8',
    }),
  );
}

/** Posts one batch (plain JSON, text/plain, `?key=`) as a browser on `ua` would. */
async function postBatch(writeKey, ua, events, siteOrigin = origin) {
  const r = await fetch(`${origin}/v1/batch?key=${writeKey}`, {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain', Origin: siteOrigin, 'User-Agent': ua },
    body: JSON.stringify({ sent_at: Date.now(), batch_id: randomUUID(), events }),
  });
  const text = await r.text();
  assert.equal(r.status, 200, text);
  const answer = JSON.parse(text);
  assert.equal(answer.accepted, events.length, JSON.stringify(answer));
}

function event(name, visitor, session, minutesAgo, context, props) {
  return {
    id: randomUUID(),
    name,
    ts: Date.now() - minutesAgo * 60000,
    anonymous_id: visitor,
    session_id: session,
    context,
    ...(props ? { props } : {}),
  };
}

async function api(path, readKey, query) {
  const r = await fetch(`${origin}${path}?${query}`, { headers: { Authorization: `Bearer ${readKey}` } });
  const text = await r.text();
  assert.equal(r.status, 200, `${path}?${query}: ${text}`);
  return JSON.parse(text);
}

before(async () => {
  need(existsSync(BIN), `the collector binary is missing at ${BIN}: cargo build -p tracklet-collector`);
  db = await freshDatabase();
  const port = await freePort();
  origin = `http://127.0.0.1:${port}`;
  // The shop lists the collector's own origin; the blog does not (the dashboard's same-origin
  // GETs carry no Origin header, so it needs no entry).
  projects = [addProject('shop', origin), addProject('blog', BLOG)];
  proc = spawn(BIN, ['--database-url', db.url, 'serve', '--listen', `127.0.0.1:${port}`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  proc.stderr.on('data', (d) => (log += d));
  const deadline = Date.now() + 20000;
  for (;;) {
    try {
      if ((await fetch(origin + '/healthz')).ok) break;
    } catch {}
    if (proc.exitCode !== null || Date.now() > deadline) throw new Error('the collector did not start:\n' + log);
    await new Promise((r) => setTimeout(r, 100));
  }
  const home = (path, referrer) => ({ path, ...(referrer ? { referrer } : {}) });
  const wk = projects[0].write_key;
  const campaign = 'https://shop.example/?utm_source=newsletter&utm_medium=email&utm_campaign=launch';
  // Desktop Chrome: visitor A (two sessions) and visitor C.
  await postBatch(wk, CHROME_WINDOWS, [
    event('page_view', 'visitor-a', 'session-1', 30, { ...home('/', 'https://www.google.com/search?q=x'), url: campaign }),
    event('page_view', 'visitor-a', 'session-1', 29, home('/pricing')),
    event('Signup', 'visitor-a', 'session-1', 28, home('/pricing'), { plan: 'pro' }),
    event('page_view', 'visitor-a', 'session-4', 10, home('/docs')),
    event('page_view', 'visitor-c', 'session-3', 20, home('/pricing', 'https://news.ycombinator.com/item')),
    event('Signup', 'visitor-c', 'session-3', 19, home('/pricing'), { plan: 'free' }),
    event('page_view', 'visitor-c', 'session-3', 18, home('/docs')),
  ]);
  // Mobile Safari: visitor B bounces; visitor D reads the docs.
  await postBatch(wk, SAFARI_IPHONE, [
    event('page_view', 'visitor-b', 'session-2', 25, home('/')),
    event('page_view', 'visitor-d', 'session-5', 15, home('/docs', 'https://news.ycombinator.com/')),
    event('Download', 'visitor-d', 'session-5', 14, home('/docs'), { file: 'guide.pdf' }),
  ]);
  // The second project gets one page view of its own.
  await postBatch(projects[1].write_key, CHROME_WINDOWS, [event('page_view', 'visitor-z', 'session-z', 5, home('/blog'))], BLOG);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  if (proc && proc.exitCode === null) {
    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('exit', r));
  }
  await db?.drop();
});

async function openDashboard() {
  const page = await browser.context.newPage();
  await page.setViewportSize({ width: 1280, height: 900 });
  const problems = [];
  page.on('console', (m) => m.type() === 'error' && problems.push(m.text()));
  page.on('pageerror', (e) => problems.push(e.message));
  const response = await page.goto(`${origin}/dashboard`);
  assert.equal(response.status(), 200);
  const headers = response.headers();
  assert.match(headers['content-type'], /^text\/html/);
  assert.match(headers['content-security-policy'], /default-src 'self'/);
  assert.doesNotMatch(headers['content-security-policy'], /unsafe-inline|unsafe-eval/);
  return { page, problems };
}

async function signIn(page, key) {
  await page.fill('#key', key);
  await page.click('#signin-form button[type=submit]');
}

/**
 * Waits for a finished load whose query satisfies `want`; returns that query. Polled from
 * here: the page's CSP (no 'unsafe-eval') refuses a predicate built from a string there.
 */
async function ready(page, want = () => true) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const [state, query] = await page.$eval('#dash', (d) => [d.dataset.state, d.dataset.query || '']);
    if (state === 'ready' && want(query)) return query;
    if (Date.now() > deadline) throw new Error(`no finished load as wanted (state ${state}, query ${query})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Pixels of the chart's canvas that are not transparent (its lines, axes and grid). */
async function inkedPixels(page) {
  return page.$eval('#chart .uplot canvas', (c) => {
    const { data } = c.getContext('2d').getImageData(0, 0, c.width, c.height);
    let n = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
    return n;
  });
}

/** Every figure and list on the page equals the API's answer for the page's own query. */
async function assertMatchesApi(page, readKey) {
  const query = await page.$eval('#dash', (d) => d.dataset.query);
  const summary = await api('/v1/stats/summary', readKey, query);
  for (const m of METRICS) {
    const [text, value] = await page.$eval(`[data-metric="${m}"]`, (el) => [el.textContent, el.dataset.value]);
    assert.equal(Number(text), Math.round(summary[m] * 100) / 100, `${m} text ${text} vs API ${summary[m]}`);
    assert.equal(Number(value), summary[m], `${m} data-value`);
  }
  for (const [list, [by, field]] of Object.entries(LISTS)) {
    const q = new URLSearchParams(query);
    q.set('by', by);
    const { rows } = await api('/v1/stats/breakdown', readKey, q);
    const shown = await page.$$eval(`[data-list="${list}"] li[data-key]`, (lis) =>
      lis.map((li) => [li.dataset.key, Number(li.dataset.value)]),
    );
    assert.deepEqual(shown, rows.map((r) => [r.key, r[field]]), `list ${list}`);
  }
  return summary;
}

test('signed in with the read key, every figure and list equals the stats API; a page filter follows', async () => {
  const { page, problems } = await openDashboard();
  const rk = projects[0].read_key;
  await signIn(page, rk);
  const query = await ready(page);
  assert.match(query, /^from=\d{4}-\d\d-\d\d&to=\d{4}-\d\d-\d\d$/, 'the default range has no filter');
  const all = await assertMatchesApi(page, rk);
  assert.deepEqual([all.visitors, all.sessions, all.pageviews, all.events], [4, 5, 7, 10]);
  assert.ok((await page.$$eval('[data-list="pages"] li[data-key]', (l) => l.length)) === 3);
  const utm = await page.$eval('[data-list="utm_sources"] li[data-key]', (li) => [li.dataset.key, li.dataset.value]);
  assert.deepEqual(utm, ['newsletter', '1']);
  // The chart (uPlot): both series and the previous period, over the API's buckets, drawn.
  const series = await api('/v1/stats/timeseries', rk, query);
  const chart = await page.$eval('#chart', (c) => ({ ...c.dataset }));
  assert.equal(chart.series, 'Visitors,Page views,Visitors (previous),Page views (previous)');
  assert.equal(Number(chart.points), series.buckets.length);
  assert.equal(Number(chart.pageviews), 7);
  assert.ok((await inkedPixels(page)) > 500, 'the chart canvas has lines on it');

  await page.screenshot({ path: join(root, 'target/dashboard.png'), fullPage: true });
  // A phone-sized viewport: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForFunction(() => document.querySelector('#chart .uplot').getBoundingClientRect().width < 400);
  assert.equal(await page.evaluate(() => document.documentElement.scrollWidth <= 390), true, 'no horizontal scroll at 390 px');
  await page.screenshot({ path: join(root, 'target/dashboard-mobile.png'), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });
  // Dark mode: dark page, the chart drawn again in the dark scheme's colours.
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForFunction(() => getComputedStyle(document.body).backgroundColor === 'rgb(17, 21, 28)');
  await page.waitForFunction(() => document.querySelector('#chart .uplot').getBoundingClientRect().width > 1000);
  assert.ok((await inkedPixels(page)) > 500, 'the chart is drawn in dark mode');
  await page.screenshot({ path: join(root, 'target/dashboard-dark.png'), fullPage: true });
  await page.emulateMedia({ colorScheme: 'light' });

  // Click the /pricing row of the pages list: a chip, and every figure follows the filter.
  await page.click('[data-list="pages"] li[data-key="/pricing"] button');
  await ready(page, (q) => q.includes('page=%2Fpricing'));
  assert.equal(await page.$eval('#filters', (f) => f.textContent.includes('page: /pricing')), true);
  const pricing = await assertMatchesApi(page, rk);
  assert.deepEqual([pricing.visitors, pricing.sessions], [2, 2]);
  assert.notEqual(pricing.events, all.events);

  // A second filter (browser), then remove the page chip.
  await page.click('[data-list="browsers"] li[data-key] button');
  await ready(page, (q) => q.includes('browser='));
  await assertMatchesApi(page, rk);
  await page.click('#filters li[data-filter="page"] button');
  await ready(page, (q) => !q.includes('page=') && q.includes('browser='));
  await assertMatchesApi(page, rk);

  // Range picker: today.
  await page.selectOption('#range', 'today');
  await ready(page, (q) => {
    const p = new URLSearchParams(q);
    return Date.parse(p.get('to')) - Date.parse(p.get('from')) === 86400000;
  });
  await assertMatchesApi(page, rk);

  // Range picker: custom dates (the `to` day included: the API is asked up to the next day).
  const day = (offset) => new Date(Date.now() + offset * 86400000).toISOString().slice(0, 10);
  await page.selectOption('#range', 'custom');
  await page.fill('#from', day(-3));
  await page.fill('#to', day(0));
  await page.click('#apply-range');
  await ready(page, (q) => q.startsWith(`from=${day(-3)}&to=${day(1)}`));
  await assertMatchesApi(page, rk);

  // Click an event, then break it down by a prop.
  await page.click('#filters li[data-filter="browser"] button');
  await ready(page, (q) => !q.includes('browser='));
  await page.click('[data-list="events"] li[data-key="Signup"] button');
  await ready(page, (q) => q.includes('event=Signup'));
  await assertMatchesApi(page, rk);
  await page.fill('#prop', 'plan');
  await page.click('#prop-form button[type=submit]');
  await page.waitForSelector('[data-list="props"] li[data-key]');
  const props = await page.$$eval('[data-list="props"] li[data-key]', (l) => l.map((li) => [li.dataset.key, li.dataset.value]));
  assert.deepEqual(props.sort(), [['free', '1'], ['pro', '1']]);

  assert.deepEqual(problems, [], 'no console errors (no CSP violation)');
  await page.close();
});

test('a funnel of a page and an event: the rows equal the funnel API', async () => {
  const { page, problems } = await openDashboard();
  const rk = projects[0].read_key;
  await signIn(page, rk);
  await ready(page);
  // One step only: refused in the page, nothing asked.
  await page.fill('[data-step-value="1"]', '/pricing');
  await page.click('#funnel-form button[type=submit]');
  assert.match(await page.textContent('#funnel-error'), /at least two steps/);
  await page.selectOption('[data-step-kind="2"]', 'event');
  await page.fill('[data-step-value="2"]', 'Signup');
  await page.selectOption('[data-step-kind="3"]', 'page');
  await page.fill('[data-step-value="3"]', '/docs');
  await page.click('#funnel-form button[type=submit]');
  await page.waitForSelector('[data-list="funnel"] li[data-key]');
  const query = await ready(page);
  const q = new URLSearchParams(query);
  q.set('steps', 'page:/pricing,event:Signup,page:/docs');
  const { steps } = await api('/v1/stats/funnel', rk, q);
  const shown = await page.$$eval('[data-list="funnel"] li[data-key]', (lis) =>
    lis.map((li) => [li.dataset.key, Number(li.dataset.value), Number(li.dataset.conversion)]),
  );
  assert.deepEqual(shown, steps.map((s) => [s.step, s.sessions, s.conversion]));
  // Sessions 1 and 3 viewed /pricing then signed up; only session 3 went on to /docs.
  assert.deepEqual(shown.map((r) => r[1]), [2, 2, 1]);
  assert.deepEqual(problems, []);
  await page.close();
});

test('several read keys: the project picker switches between them', async () => {
  const { page } = await openDashboard();
  await signIn(page, projects[0].read_key);
  await ready(page);
  await page.click('#add-key');
  await signIn(page, projects[1].read_key);
  await page.waitForFunction(() => document.querySelectorAll('#project option').length === 2);
  await ready(page);
  // The picker names each project (GET /v1/project), with the start of its key.
  const options = await page.$$eval('#project option', (os) => os.map((o) => o.textContent));
  assert.deepEqual(options, [`shop (${projects[0].read_key.slice(0, 11)}…)`, `blog (${projects[1].read_key.slice(0, 11)}…)`]);
  assert.equal(await page.$eval('[data-metric="visitors"]', (e) => e.textContent), '1');
  await assertMatchesApi(page, projects[1].read_key);
  await page.selectOption('#project', projects[0].read_key);
  await page.waitForFunction(() => document.querySelector('[data-metric="visitors"]').textContent === '4');
  await ready(page);
  await assertMatchesApi(page, projects[0].read_key);
  await page.close();
});

test('a write key or an unknown key is refused, and no figure is shown', async () => {
  const { page } = await openDashboard();
  await signIn(page, projects[0].write_key);
  await page.waitForFunction(() => document.querySelector('#signin-error').textContent !== '');
  assert.match(await page.textContent('#signin-error'), /this is not a read key/);
  assert.equal(await page.isVisible('#dash'), false);
  for (const m of METRICS) assert.equal(await page.$eval(`[data-metric="${m}"]`, (e) => e.textContent), '');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('tracklet.dashboard.keys')), null);

  await signIn(page, 'rk_0000000000000000000000000000000');
  await page.waitForFunction(() => /unknown key/i.test(document.querySelector('#signin-error').textContent));
  assert.equal(await page.isVisible('#dash'), false);
  for (const m of METRICS) assert.equal(await page.$eval(`[data-metric="${m}"]`, (e) => e.textContent), '');
  await page.close();
});

test('the dashboard serves its script and stylesheet with their types and the CSP', async () => {
  for (const [path, type] of [
    ['/dashboard/app.js', /^text\/javascript/],
    ['/dashboard/app.css', /^text\/css/],
  ]) {
    const r = await fetch(origin + path);
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type'), type);
    assert.match(r.headers.get('content-security-policy'), /default-src 'self'/);
  }
});

test('ingest health: the figures, rejections and hours equal the health API', async () => {
  // The blog gets a batch with one event the collector rejects and three the SDK dropped.
  const r = await fetch(`${origin}/v1/batch?key=${projects[1].write_key}`, {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain', Origin: BLOG, 'User-Agent': CHROME_WINDOWS },
    body: JSON.stringify({
      sent_at: Date.now(),
      dropped: 3,
      events: [event('page_view', 'visitor-y', 'session-y', 1, { path: '/blog/2' }), { ...event('x', 'v', 's', 1, {}), id: 'nope' }],
    }),
  });
  assert.equal(r.status, 200, await r.text());
  // And a body that is not a batch at all.
  const bad = await fetch(`${origin}/v1/batch?key=${projects[1].write_key}`, {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain', Origin: BLOG },
    body: 'not a batch',
  });
  assert.equal(bad.status, 400);
  const rk = projects[1].read_key;
  // Counts reach the table about once a second (a batch's counts may span two flushes: the
  // SDK's dropped count is taken before the commit, the accepted one after).
  let h;
  for (const deadline = Date.now() + 10000; ; ) {
    h = await api('/v1/stats/health', rk, '');
    if (h.totals.sdk_dropped === 3 && h.totals.accepted === 2 && h.totals.batches_rejected === 1) break;
    assert.ok(Date.now() < deadline, JSON.stringify(h));
    await new Promise((res) => setTimeout(res, 100));
  }
  assert.deepEqual([h.totals.accepted, h.totals.rejected, h.totals.rejected_by_reason], [2, 1, { invalid_id: 1 }]);
  const { page, problems } = await openDashboard();
  await signIn(page, rk);
  const query = await ready(page);
  const p = new URLSearchParams(query);
  h = await api('/v1/stats/health', rk, new URLSearchParams({ from: p.get('from'), to: p.get('to') }));
  for (const name of ['accepted', 'duplicates', 'rejected', 'batches_rejected', 'sdk_dropped', 'rate_limited']) {
    assert.equal(await page.textContent(`[data-health="${name}"]`), String(h.totals[name]), name);
  }
  assert.equal(await page.textContent('[data-health="queue_depth"]'), '0');
  assert.match(await page.textContent('[data-health="last_commit"]'), /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$/);
  const rejected = await page.$$eval('[data-list="rejected"] li[data-key]', (l) => l.map((li) => [li.dataset.key, li.dataset.value]));
  assert.deepEqual(rejected, [['invalid_id', '1'], ['batch:malformed', '1']]);
  const hours = await page.$$eval('[data-list="health"] tr[data-key]', (l) => l.map((tr) => [tr.dataset.key, Number(tr.dataset.value)]));
  assert.deepEqual(hours, h.hours.slice(-48).reverse().map((x) => [x.t, x.accepted]));
  await page.screenshot({ path: join(root, 'target/dashboard-health.png'), fullPage: true });
  assert.deepEqual(problems, []);
  await page.close();
});

test('live view: the last 30 minutes on sign-in, then a newly posted event appears at the top', async () => {
  const { page, problems } = await openDashboard();
  await signIn(page, projects[0].read_key);
  await ready(page);
  await page.waitForSelector('#live-state[data-live-state="open"]');
  // The snapshot: the shop's events of the last 30 minutes (visitors A to D, some at the
  // window's edge), newest first.
  await page.waitForFunction(() => document.querySelectorAll('[data-list="live"] li[data-key]').length > 0);
  const first = await page.$$eval('[data-list="live"] li[data-key]', (l) =>
    l.map((li) => [li.dataset.value, Date.parse(li.querySelector('time').dateTime)]),
  );
  assert.ok(first.length >= 6 && first.length <= 10, JSON.stringify(first));
  assert.equal(first[0][0], 'page_view', 'the newest event (session 4, ten minutes ago) is on top');
  const times = first.map((r) => r[1]);
  assert.deepEqual(times, times.slice().sort((x, y) => y - x), 'newest first');
  assert.match(await page.textContent('[data-live="visitors"]'), /^[1-4]$/);
  // An event committed now is pushed to the open page.
  const name = `Live ${randomUUID().slice(0, 8)}`;
  await postBatch(projects[0].write_key, SAFARI_IPHONE, [event(name, 'visitor-live', 'session-live', 0, { path: '/live' })]);
  await page.waitForSelector(`[data-list="live"] li[data-value="${name}"]`, { timeout: 10000 });
  assert.equal(await page.$eval('[data-list="live"] li[data-key]', (li) => li.dataset.value), name);
  assert.match(await page.$eval(`[data-list="live"] li[data-value="${name}"]`, (li) => li.textContent), /\/live/);
  // Another project's event is not shown.
  await postBatch(projects[1].write_key, CHROME_WINDOWS, [event('Blog only', 'visitor-z', 'session-z', 0, { path: '/b' })], BLOG);
  const after = `After ${randomUUID().slice(0, 8)}`;
  await postBatch(projects[0].write_key, SAFARI_IPHONE, [event(after, 'visitor-live', 'session-live', 0, { path: '/live' })]);
  await page.waitForSelector(`[data-list="live"] li[data-value="${after}"]`, { timeout: 10000 });
  assert.equal(await page.$$eval('[data-list="live"] li[data-value="Blog only"]', (l) => l.length), 0);
  await page.screenshot({ path: join(root, 'target/dashboard-live.png') });
  assert.deepEqual(problems, []);
  await page.close();
});

test('the vendored uPlot is byte for byte the pinned npm package, and is what the collector serves', async () => {
  const pinned = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).devDependencies.uplot;
  assert.match(pinned, /^\d+\.\d+\.\d+$/, 'uplot is pinned to an exact version in package.json');
  const pkg = join(root, 'node_modules/uplot');
  need(existsSync(pkg), 'node_modules/uplot is missing: npm install');
  assert.equal(JSON.parse(readFileSync(join(pkg, 'package.json'), 'utf8')).version, pinned, 'npm install (node_modules/uplot is not the pinned version)');
  for (const [vendored, original, served] of [
    ['uPlot.iife.min.js', 'dist/uPlot.iife.min.js', '/dashboard/vendor/uPlot.iife.min.js'],
    ['uPlot.min.css', 'dist/uPlot.min.css', '/dashboard/vendor/uPlot.min.css'],
    ['uPlot.LICENSE', 'LICENSE', '/dashboard/vendor/uPlot.LICENSE'],
  ]) {
    const mine = readFileSync(join(root, 'collector/dashboard/vendor', vendored));
    assert.ok(mine.equals(readFileSync(join(pkg, original))), `${vendored} differs from uplot@${pinned}'s ${original}: npm run vendor-uplot`);
    const r = await fetch(origin + served);
    assert.equal(r.status, 200);
    assert.ok(Buffer.from(await r.arrayBuffer()).equals(mine), `${served} is the vendored file`);
  }
  assert.match(readFileSync(join(root, 'collector/dashboard/vendor/uPlot.iife.min.js'), 'utf8'), new RegExp(`^/\\*! https://github.com/leeoniya/uPlot \\(v${pinned.replace(/\./g, '\\.')}\\)`));
});

test('a database failure shows a plain message, never the database error, and the next load works', async () => {
  const { page } = await openDashboard();
  await signIn(page, projects[0].read_key);
  await ready(page);
  // Every stats query now waits on a lock until its statement timeout (5 s): 503.
  await db.query('BEGIN');
  try {
    await db.query('LOCK TABLE events IN ACCESS EXCLUSIVE MODE');
    await page.selectOption('#range', '7d');
    await page.waitForFunction(() => document.querySelector('#dash').dataset.state === 'error', null, { timeout: 20000 });
    const status = await page.textContent('#status');
    assert.match(status, /^Could not load: 503 the collector or its database is busy or unavailable/);
    const text = await page.textContent('body');
    assert.doesNotMatch(text, /statement|canceling|sqlx|database failed|error returned from database/i);
  } finally {
    await db.query('ROLLBACK');
  }
  await page.selectOption('#range', '30d');
  await ready(page);
  await assertMatchesApi(page, projects[0].read_key);
  await page.close();
});
