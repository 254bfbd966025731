// Packaging tests: `npm pack` the package, install the tarball into small consumer projects
// (Vite + React, Next.js, webpack, a plain page with the script tag, Node), build them, and run the
// builds in headless Chromium against a stub collector (and the Vite app once against the
// real collector on Postgres).
//
//   node npm/packaging_tests/run.mjs          (after `cargo xtask build`; `cargo xtask test` runs it)
//
// Consumer projects live in npm/packaging_tests/.work/ (gitignored); their node_modules are
// reinstalled only when their package.json (which names the tarball by its hash) changes.
// Nothing is skipped: any problem fails the run with a message and a non-zero exit.
import assert from 'node:assert/strict';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  eventually,
  here,
  installConsumer,
  launchBrowser,
  need,
  root,
  sh,
  sha,
  staticServer,
  stubCollector,
  work,
} from './lib.mjs';
import { startCollector } from '../../tests/e2e/harness.mjs';

const started = Date.now();
const log = (msg) => console.log(`[packaging ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
const npmDir = join(root, 'npm');
const consumers = join(here, 'consumers');

// ---- the tarball ------------------------------------------------------------------------

for (const f of ['index.js', 'slim.js', 'react.js', 'tracklet.js', 'tracklet.wasm']) {
  need(existsSync(join(npmDir, 'dist', f)), `npm/dist/${f} is missing: run cargo xtask build first`);
}
mkdirSync(join(work, 'pack'), { recursive: true });
rmSync(join(work, 'pack'), { recursive: true, force: true });
mkdirSync(join(work, 'pack'), { recursive: true });
const packed = JSON.parse(sh('npm', ['pack', '--json', '--pack-destination', join(work, 'pack')], { cwd: npmDir }));
const packFile = join(work, 'pack', packed[0].filename);
const tarBytes = readFileSync(packFile);
const hash = sha(tarBytes).slice(0, 12);
// The tarball under a name that changes with its content, so consumers reinstall exactly then.
const tarballs = join(work, 'tarballs');
mkdirSync(tarballs, { recursive: true });
const tarball = join(tarballs, `tracklet-${hash}.tgz`);
writeFileSync(tarball, tarBytes);
for (const f of readdirSync(tarballs)) if (f !== `tracklet-${hash}.tgz`) rmSync(join(tarballs, f));
const unpacked = join(work, 'unpacked');
rmSync(unpacked, { recursive: true, force: true });
mkdirSync(unpacked, { recursive: true });
sh('tar', ['-xzf', tarball, '-C', unpacked]);
const pkgDir = join(unpacked, 'package');
log(`packed ${packed[0].filename} (${tarBytes.length} B, ${packed[0].entryCount} files, sha ${hash})`);

const tarballDep = (dir) => 'file:' + join('..', 'tarballs', `tracklet-${hash}.tgz`).replace(/\\/g, '/');

// ---- tests ------------------------------------------------------------------------------

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test('package: manifest, files, entries', async () => {
  const pkg = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'));
  assert.equal(pkg.name, 'tracklet');
  assert.equal(pkg.version, '0.1.0');
  assert.equal(pkg.type, 'module');
  assert.equal(pkg.dependencies, undefined, 'no runtime dependencies');
  assert.equal(pkg.peerDependenciesMeta?.react?.optional, true, 'react is an optional peer');
  const files = packed[0].files.map((f) => f.path).sort();
  assert.deepEqual(files, [
    'README.md',
    'dist/index.js',
    'dist/react.js',
    'dist/slim.js',
    'dist/tracklet.js',
    'dist/tracklet.wasm',
    'package.json',
    'types/index.d.ts',
    'types/react.d.ts',
    'types/slim.d.ts',
    'types/tracker.d.ts',
  ]);
  // Every export target exists.
  for (const [sub, target] of Object.entries(pkg.exports)) {
    for (const file of typeof target === 'string' ? [target] : Object.values(target)) {
      assert.ok(existsSync(join(pkgDir, file)), `exports["${sub}"] -> ${file} is in the package`);
    }
  }
  // The script-tag build ships exactly as `cargo xtask build` made it (its size is checked in CI).
  for (const f of ['tracklet.js', 'tracklet.wasm']) {
    assert.ok(readFileSync(join(pkgDir, 'dist', f)).equals(readFileSync(join(npmDir, 'dist', f))), `dist/${f} unchanged`);
  }
  // The ESM entries must not look for their <script> element, and the default one inlines the wasm.
  for (const f of ['index.js', 'slim.js', 'react.js']) {
    const js = readFileSync(join(pkgDir, 'dist', f), 'utf8');
    assert.ok(!js.includes('currentScript'), `dist/${f} does not use document.currentScript`);
    assert.ok(!js.includes('import.meta'), `dist/${f} does not use import.meta (bundlers would go looking for files)`);
  }
  const wasmB64 = readFileSync(join(npmDir, 'dist', 'tracklet.wasm')).toString('base64');
  assert.ok(readFileSync(join(pkgDir, 'dist', 'index.js'), 'utf8').includes(wasmB64), 'dist/index.js inlines tracklet.wasm');
  assert.ok(!readFileSync(join(pkgDir, 'dist', 'slim.js'), 'utf8').includes(wasmB64.slice(0, 200)), 'dist/slim.js does not');
});

// Installs first, so a registry problem shows before any browser starts.
const nodeDir = join(work, 'node-ssr');
const webpackDir = join(work, 'webpack');
const viteDir = join(work, 'vite-react');
const nextDir = join(work, 'next');

test('install consumers (cached in npm/packaging_tests/.work)', async () => {
  installConsumer(
    nodeDir,
    {
      name: 'consumer-node-ssr',
      private: true,
      type: 'module',
      dependencies: { tracklet: tarballDep(), react: '^19.0.0', 'react-dom': '^19.0.0' },
      devDependencies: { typescript: '^5.9.0', '@types/react': '^19.0.0' },
    },
    log,
  );
  installConsumer(
    webpackDir,
    {
      name: 'consumer-webpack',
      private: true,
      type: 'module',
      dependencies: { tracklet: tarballDep() },
      devDependencies: { webpack: '^5.0.0', 'webpack-cli': '^6.0.0' },
    },
    log,
  );
  const example = JSON.parse(readFileSync(join(root, 'examples/react/package.json'), 'utf8'));
  example.dependencies.tracklet = tarballDep();
  try {
    installConsumer(viteDir, example, log);
  } catch (e) {
    log(`vite ${example.devDependencies.vite} did not install; trying vite@^7:\n${String(e.message).slice(0, 2000)}`);
    example.devDependencies.vite = '^7.0.0';
    installConsumer(viteDir, example, log);
  }
  installConsumer(
    nextDir,
    {
      name: 'consumer-next',
      private: true,
      dependencies: { next: '^16.0.0', react: '^19.0.0', 'react-dom': '^19.0.0', tracklet: tarballDep() },
    },
    log,
  );
  const version = (dir, pkg) => JSON.parse(readFileSync(join(dir, 'node_modules', pkg, 'package.json'), 'utf8')).version;
  log(`consumers ready: vite ${version(viteDir, 'vite')}, webpack ${version(webpackDir, 'webpack')}, next ${version(nextDir, 'next')}`);
});

test('node: importing every entry on the server does not throw; init() is inert; SSR renders', async () => {
  cpSync(join(consumers, 'node'), nodeDir, { recursive: true });
  const out = JSON.parse(sh('node', ['ssr.mjs'], { cwd: nodeDir }).trim().split('\n').pop());
  assert.equal(out.version, '0.1.0');
  assert.match(out.html, /<span class="tracklet-sync" data-state="idle" data-pending="0"[^>]*>all sent<\/span>/);
  assert.match(out.html, /hook:0:false/);
  assert.match(out.htmlNoProvider, /hook:0:false/);
});

test('types: the declarations compile against a TypeScript consumer (tsc, nodenext)', async () => {
  sh('node', [join(nodeDir, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], { cwd: nodeDir });
});

let browser;
let stub;

async function withSite(dir, opts, fn) {
  const site = await staticServer(dir, opts);
  try {
    return await fn(site);
  } finally {
    await site.close();
  }
}

test('vite + react (examples/react): provider, hook and SyncStatus in Chromium', async () => {
  rmSync(join(viteDir, 'src'), { recursive: true, force: true });
  for (const f of ['index.html', 'vite.config.js', 'src']) cpSync(join(root, 'examples/react', f), join(viteDir, f), { recursive: true });
  sh('node', [join(viteDir, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'warn'], { cwd: viteDir });
  const assets = readdirSync(join(viteDir, 'dist/assets'));
  assert.ok(!assets.some((f) => f.endsWith('.wasm')), `no separate wasm asset (inlined): ${assets}`);
  await withSite(join(viteDir, 'dist'), { fallback: () => 'index.html' }, async (site) => {
    const page = await browser.page();
    const q = new URLSearchParams({ endpoint: stub.origin, apiKey: 'vite-key', maxBatchSize: '100', maxWaitTime: '600000' });
    await page.goto(`${site.origin}/?${q}`);
    const badge = page.locator('.tracklet-sync');
    let seen = '';
    const badgeIs = (state, pending) =>
      eventually(
        async () => {
          seen = `${await badge.getAttribute('data-state')} ${await badge.getAttribute('data-pending')}`;
          return seen === `${state} ${pending}`;
        },
        () => `badge "${state} ${pending}" (state, pending); it shows "${seen}"`,
      );
    // The page view from autocapture is queued (nothing is sent before 100 events or 10 min).
    await badgeIs('pending', 1);
    for (const id of [1, 2, 3]) await page.click(`button.add[data-product="${id}"]`);
    await badgeIs('pending', 4);
    assert.equal(await page.textContent('#hook-state'), '4 pending');
    assert.equal(await badge.textContent(), '4 pending');
    // Send, with the collector holding its answer: the hook shows the batch in flight.
    stub.hold();
    await page.click('#send-now');
    await badgeIs('sending', 4);
    assert.equal(await page.textContent('#hook-state'), '4 pending, sending');
    assert.equal(stub.held(), 1);
    stub.release();
    await badgeIs('idle', 0);
    assert.equal(await badge.textContent(), 'all sent');
    assert.equal(await page.textContent('#hook-state'), '0 pending');
    const added = stub.events.filter((e) => e.name === 'Product Added');
    assert.deepEqual(added.map((e) => e.props.productId).sort(), [1, 2, 3]);
    assert.ok(added.every((e) => e.key === 'vite-key' && e.id && e.anonymous_id));
    assert.deepEqual(stub.events.filter((e) => e.name === 'page_view').map((e) => e.props.path), ['/']);
    // Client-side navigation in the layout is a page view too.
    await page.click('nav >> text=Cart');
    await page.waitForSelector('#cart-page');
    await badgeIs('pending', 1);
    await page.click('#send-now');
    await badgeIs('idle', 0);
    assert.deepEqual(stub.events.filter((e) => e.name === 'page_view').map((e) => e.props.path), ['/', '/cart']);
    assert.ok(!site.requests.some((p) => p.endsWith('.wasm')), 'no .wasm request: the wasm is inlined');
    await page.close();
  });
});

test('vite + react in Chromium against the real collector: the events land in Postgres', async () => {
  // The build from the previous test, served from its own origin; the collector binary on a
  // fresh Postgres database allows that origin.
  await withSite(join(viteDir, 'dist'), { fallback: () => 'index.html' }, async (site) => {
    const c = await startCollector({ extraOrigins: [site.origin] });
    try {
      const page = await browser.page();
      const q = new URLSearchParams({ endpoint: c.origin, apiKey: c.key, maxBatchSize: '100', maxWaitTime: '600000' });
      await page.goto(`${site.origin}/?${q}`);
      const badge = page.locator('.tracklet-sync');
      for (const id of [1, 2]) await page.click(`button.add[data-product="${id}"]`);
      await eventually(async () => (await badge.getAttribute('data-pending')) === '3', () => 'three pending events');
      await page.click('#send-now');
      await eventually(async () => (await badge.getAttribute('data-state')) === 'idle', () => 'the badge to show all sent');
      const rows = await c.db.query("SELECT name, props->>'productId' AS product FROM events ORDER BY ts, id");
      assert.deepEqual(rows.map((r) => [r.name, r.product]), [['page_view', null], ['Product Added', '1'], ['Product Added', '2']]);
      await page.close();
    } finally {
      await c.stop();
    }
  });
});

test('webpack: default entry (inlined wasm) and slim entry (wasm as an asset) in Chromium', async () => {
  for (const f of ['webpack.config.mjs', 'main.html', 'slim.html', 'src']) cpSync(join(consumers, 'webpack', f), join(webpackDir, f), { recursive: true });
  sh('node', [join(webpackDir, 'node_modules/webpack-cli/bin/cli.js'), '--config', 'webpack.config.mjs'], { cwd: webpackDir });
  for (const f of ['main.html', 'slim.html']) cpSync(join(webpackDir, f), join(webpackDir, 'dist', f));
  await withSite(join(webpackDir, 'dist'), {}, async (site) => {
    const page = await browser.page();
    await page.goto(`${site.origin}/main.html?endpoint=${encodeURIComponent(stub.origin)}`);
    await page.waitForFunction(() => window.tracker);
    assert.equal(await page.evaluate(() => window.defaultExportMatches), true, 'default export has init and VERSION');
    assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 2, pending: 0 });
    assert.deepEqual(stub.names().sort(), ['Webpack Clicked', 'Webpack Loaded']);
    assert.equal(stub.events.find((e) => e.name === 'Webpack Loaded').props.version, '0.1.0');
    assert.ok(!site.requests.some((p) => p.endsWith('.wasm')), 'the default entry makes no .wasm request');

    await page.goto(`${site.origin}/slim.html?endpoint=${encodeURIComponent(stub.origin)}`);
    await page.waitForFunction(() => window.tracker);
    assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 1, pending: 0 });
    const slim = stub.events.find((e) => e.name === 'Slim Loaded');
    assert.ok(slim && slim.key === 'webpack-slim-key', 'the slim page event arrived');
    assert.ok(site.requests.some((p) => p.endsWith('.wasm')), 'the slim entry fetched the wasm asset');
    await page.close();
  });
});

test('next.js (app router, static export, StrictMode): provider, hook and page views in Chromium', async () => {
  for (const d of ['app', 'out', '.next']) rmSync(join(nextDir, d), { recursive: true, force: true });
  cpSync(join(consumers, 'next'), nextDir, { recursive: true });
  // The endpoint is baked into the client bundle at build time.
  writeFileSync(join(nextDir, '.env.production'), `NEXT_PUBLIC_TRACKLET_ENDPOINT=${stub.origin}\n`);
  sh('node', [join(nextDir, 'node_modules/next/dist/bin/next'), 'build'], {
    cwd: nextDir,
    env: { ...process.env, NEXT_TELEMETRY_DISABLED: '1' },
  });
  // The server render (at build time) shows the inert tracker's badge.
  assert.match(readFileSync(join(nextDir, 'out/index.html'), 'utf8'), /data-state="idle"/);
  await withSite(join(nextDir, 'out'), {}, async (site) => {
    const page = await browser.page();
    await page.goto(`${site.origin}/`);
    const pending = (n) =>
      eventually(async () => (await page.textContent('#pending')) === `${n} pending`, () => `${n} pending events`);
    await pending(1); // the page view
    await page.click('#add'); // autocapture's click, and the hook's track()
    await pending(3);
    await page.click('#send');
    await pending(0);
    // Client-side navigation is a page view too; StrictMode's double mount started one tracker.
    await page.click('nav >> text=Cart');
    await page.waitForSelector('#cart-page');
    await page.click('#send');
    await eventually(
      () => stub.events.filter((e) => e.name === 'page_view').length === 2,
      () => `two page views (got ${stub.names()})`,
    );
    assert.deepEqual(stub.events.filter((e) => e.name === 'page_view').map((e) => e.props.path), ['/', '/cart/']);
    const clicked = stub.events.filter((e) => e.name === 'Next Clicked');
    assert.equal(clicked.length, 1);
    assert.ok(clicked[0].key === 'next-key' && clicked[0].props.n === 1);
    // Autocapture saw every click, each before the click's own handler ran.
    assert.deepEqual(
      stub.events.filter((e) => e.name === 'click').map((e) => [e.props.tag, e.props.text]),
      [['button', 'Add'], ['button', 'Send'], ['a', 'Cart'], ['button', 'Send']],
    );
    await page.close();
    // Next's router cancels its own fetches of the site's routes (prefetches, RSC payloads)
    // when a navigation supersedes them: not a failure of the page.
    const aborted = (e) => e.startsWith(`request failed: ${site.origin}/`) && e.endsWith('(net::ERR_ABORTED)');
    for (let i = browser.errors.length - 1; i >= 0; i--) if (aborted(browser.errors[i])) browser.errors.splice(i, 1);
  });
});

// The README's pre-load snippet, verbatim, pointed at the stub.
function readmeSnippet() {
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  const block = [...readme.matchAll(/```html\n([\s\S]*?)```/g)].map((m) => m[1]).find((b) => b.includes('.q.push'));
  need(block, 'README.md has no ```html block with the pre-load snippet (tracklet.q.push)');
  return block;
}

test('script tag: the README pre-load snippet queues calls until tracklet.js arrives, then they are sent', async () => {
  const site = join(work, 'script-tag');
  rmSync(site, { recursive: true, force: true });
  mkdirSync(site, { recursive: true });
  cpSync(join(pkgDir, 'dist/tracklet.js'), join(site, 'tracklet/tracklet.js'));
  cpSync(join(pkgDir, 'dist/tracklet.wasm'), join(site, 'tracklet/tracklet.wasm'));
  const snippet = readmeSnippet();
  need(snippet.includes('https://collector.example.com') && snippet.includes('WRITE_KEY'), 'the README snippet names the placeholders');
  const html = `<!doctype html><meta charset="utf-8"><title>script tag</title>
${snippet.replace('https://collector.example.com', stub.origin).replace('WRITE_KEY', 'tag-key')}
<script>
  tracklet.identify('user-7', { plan: 'pro' });
  tracklet.track('Before Load', { n: 1 });
</script>
<p>plain page</p>`;
  writeFileSync(join(site, 'index.html'), html);
  await withSite(site, { gated: ['/tracklet/tracklet.js'] }, async (server) => {
    const page = await browser.page();
    await page.goto(server.origin + '/', { waitUntil: 'commit' });
    // tracklet.js is held back by the server: the calls wait in the stub's queue.
    await page.waitForFunction(() => window.tracklet && window.tracklet.q && window.tracklet.q.length === 3);
    assert.deepEqual(
      await page.evaluate(() => window.tracklet.q.map((c) => c[0])),
      ['track', 'identify', 'track'],
    );
    assert.equal(await page.evaluate(() => window.tracklet.VERSION), undefined, 'the real script has not run');
    assert.equal(stub.events.length, 0);
    server.release('/tracklet/tracklet.js');
    await page.waitForFunction(() => window.tracklet.VERSION === '0.1.0');
    const r = await page.evaluate(() => window.tracklet.forceSend());
    assert.equal(r.pending, 0);
    const names = stub.names();
    for (const n of ['Signup Started', 'identify', 'Before Load', 'page_view']) assert.ok(names.includes(n), `${n} arrived (got ${names})`);
    const order = names.filter((n) => n !== 'page_view');
    assert.deepEqual(order, ['Signup Started', 'identify', 'Before Load'], 'replayed in order');
    const before = stub.events.find((e) => e.name === 'Before Load');
    assert.equal(before.user_id, 'user-7', 'identify() from the queue applies to later events');
    assert.equal(before.key, 'tag-key');
    assert.deepEqual(stub.events.find((e) => e.name === 'Signup Started').props, { plan: 'pro' });
    await page.close();
  });
});

test('script tag: examples/spa sends a page view per client-side route', async () => {
  const site = join(work, 'spa-site');
  rmSync(site, { recursive: true, force: true });
  cpSync(join(root, 'examples/spa'), join(site, 'spa'), { recursive: true });
  cpSync(join(pkgDir, 'dist'), join(site, 'dist'), { recursive: true });
  writeFileSync(join(site, 'spa/config.js'), `window.TRACKLET_CONFIG = ${JSON.stringify({ endpoint: stub.origin, apiKey: 'spa-key' })};`);
  await withSite(site, { fallback: (p) => (p.startsWith('/spa/') ? 'spa/index.html' : null) }, async (server) => {
    const page = await browser.page();
    await page.goto(`${server.origin}/spa/?maxBatchSize=100&maxWaitTime=600000`);
    await page.waitForFunction(() => window.tracker && window.tracker.status().pending === 1);
    await page.click('nav >> text=About');
    await page.waitForSelector('h2:text("About")');
    await page.click('nav >> text=Pricing');
    await page.click('#subscribe');
    await page.goBack();
    await page.waitForSelector('h2:text("About")');
    assert.deepEqual(await page.evaluate(() => window.tracker.forceSend()), { sent: 4 + 3 + 1, pending: 0 });
    const views = stub.events.filter((e) => e.name === 'page_view').map((e) => e.props.path);
    assert.deepEqual(views, ['/spa/', '/spa/about', '/spa/pricing', '/spa/about']);
    assert.equal(stub.events.filter((e) => e.name === 'Subscribed').length, 1);
    assert.equal(stub.events.find((e) => e.name === 'Subscribed').context.path, '/spa/pricing');
    await page.close();
  });
});

// ---- run --------------------------------------------------------------------------------

let passed = 0;
let failed = 0;
for (const t of tests) {
  const needsBrowser = /Chromium|script tag/.test(t.name);
  const t0 = Date.now();
  // Each browser test gets its own Chromium profile and stub collector, so a failed test
  // leaves nothing behind for the next one.
  try {
    if (needsBrowser) {
      browser = await launchBrowser();
      stub = await stubCollector();
    }
    // A hung step (a page that never answers) fails its test instead of the whole run.
    let timer;
    await Promise.race([
      t.fn(),
      new Promise((_, reject) => (timer = setTimeout(() => reject(new Error('test timed out after 120 s')), 120000))),
    ]).finally(() => clearTimeout(timer));
    if (browser?.errors.length) throw new Error('errors in the page:\n' + browser.errors.join('\n'));
    passed++;
    log(`ok   ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)}s)`);
  } catch (e) {
    failed++;
    log(`FAIL ${t.name}\n${e.stack || e}`);
    if (/^install/.test(t.name)) {
      log('cannot go on without the consumer projects');
      break;
    }
  } finally {
    await stub?.close();
    await browser?.close();
    stub = browser = undefined;
  }
}
const ran = passed + failed;
if (ran < tests.length) failed += tests.length - ran;
console.log(`${passed} passed, ${failed} failed (${((Date.now() - started) / 1000).toFixed(1)}s)`);
process.exit(failed ? 1 : 0);
