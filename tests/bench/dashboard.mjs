// "Page interactive" for `cargo xtask bench dashboard`: headless Chromium opens /dashboard on
// the benchmark's collector, signs in with the read key, then reloads the page `runs` times
// (the key stays in sessionStorage, as for a returning user) and measures from the start of
// each reload until the default view (30 days) has every figure, the chart and every list
// drawn (`#dash[data-state=ready]`). Polled from here every 10 ms: the page's CSP forbids
// string predicates. Prints one line: `page interactive: p50 X ms, p95 Y ms, max Z ms (N loads)`.
//
// Usage: node tests/bench/dashboard.mjs ORIGIN READ_KEY [RUNS]
import { launchBrowser } from '../e2e/harness.mjs';

const [origin, key, runsArg] = process.argv.slice(2);
if (!origin || !key) {
  console.error('usage: node tests/bench/dashboard.mjs ORIGIN READ_KEY [RUNS]');
  process.exit(2);
}
const runs = Number(runsArg || 10);

async function ready(page, deadlineMs = 30000) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const state = await page.$eval('#dash', (d) => d.dataset.state || '').catch(() => '');
    if (state === 'ready') return;
    if (state === 'error' || Date.now() > deadline) throw new Error(`dashboard not ready (state ${state || 'none'})`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const browser = await launchBrowser();
try {
  const page = await browser.context.newPage();
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.goto(`${origin}/dashboard`);
  await page.fill('#key', key);
  await page.click('#signin-form button[type=submit]');
  await ready(page);
  const times = [];
  for (let i = 0; i < runs; i++) {
    const started = Date.now();
    await page.reload();
    await ready(page);
    times.push(Date.now() - started);
  }
  times.sort((a, b) => a - b);
  const at = (p) => times[Math.max(0, Math.ceil(times.length * p) - 1)];
  console.log(`page interactive: p50 ${at(0.5)} ms, p95 ${at(0.95)} ms, max ${at(1)} ms (${runs} loads)`);
} finally {
  await browser.close();
}
