// Tracklet dashboard: plain ES module, no framework, nothing loaded from elsewhere. The chart
// is uPlot (vendored: collector/dashboard/vendor/, loaded before this module as `uPlot`).
// Reads the stats API (docs/stats-api.md) with a read key kept in sessionStorage.

const KEYS = 'tracklet.dashboard.keys';
const CURRENT = 'tracklet.dashboard.current';
const NAMES = 'tracklet.dashboard.names'; // read key -> project name, for the picker
const DAY = 86400000;

// data-list name -> [breakdown `by`, filter it adds when a row is clicked, value shown]
const LISTS = {
  pages: ['page', 'page', 'visitors'],
  entry_pages: ['entry_page', 'page', 'visitors'],
  exit_pages: ['exit_page', 'page', 'visitors'],
  referrers: ['referrer', 'referrer', 'visitors'],
  utm_sources: ['utm_source', 'utm_source', 'visitors'],
  utm_mediums: ['utm_medium', 'utm_medium', 'visitors'],
  utm_campaigns: ['utm_campaign', 'utm_campaign', 'visitors'],
  browsers: ['browser', 'browser', 'visitors'],
  os: ['os', 'os', 'visitors'],
  devices: ['device', 'device', 'visitors'],
  countries: ['country', 'country', 'visitors'],
  events: ['event', 'event', 'events'],
};
const METRICS = ['visitors', 'sessions', 'pageviews', 'events', 'bounce_rate', 'avg_session_seconds'];

const $ = (sel) => document.querySelector(sel);
const state = { filters: [], propEvent: null, prop: '', funnel: '', loadId: 0 };

// ---- keys -----------------------------------------------------------------------------

/** The JSON value kept under `name` in sessionStorage, or `fallback` if missing or unreadable. */
function stored(name, fallback) {
  try {
    return JSON.parse(sessionStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
}
function keys() {
  const k = stored(KEYS, []);
  return Array.isArray(k) ? k.filter((x) => typeof x === 'string') : [];
}
function saveKeys(list) {
  sessionStorage.setItem(KEYS, JSON.stringify(list));
}
function currentKey() {
  const k = sessionStorage.getItem(CURRENT);
  return k && keys().includes(k) ? k : keys()[0] || null;
}
function names() {
  const n = stored(NAMES, {});
  return typeof n === 'object' ? n : {};
}
function keyLabel(key) {
  const name = names()[key];
  const short = key.slice(0, 11) + '…';
  return typeof name === 'string' && name ? `${name} (${short})` : short;
}

/** Refuses a write key without sending it; else asks the API whether it is a read key. */
async function signIn(event) {
  event.preventDefault();
  const input = $('#key');
  const key = input.value.trim();
  const error = $('#signin-error');
  error.textContent = '';
  if (!key) return;
  if (key.startsWith('wk_')) {
    error.textContent = 'This is a write key: this is not a read key. Use the project\'s read key (rk_…).';
    return;
  }
  let r;
  try {
    r = await api('/v1/project', key, new URLSearchParams());
  } catch (e) {
    error.textContent = 'The collector could not be reached: ' + e.message;
    return;
  }
  if (r.status === 401) {
    error.textContent = 'Unknown key: no project has this read key.';
    return;
  }
  if (!r.ok) {
    error.textContent = 'The collector answered ' + r.status + ': ' + (await errorText(r));
    return;
  }
  const project = await r.json().catch(() => null);
  if (project && typeof project.name === 'string') {
    sessionStorage.setItem(NAMES, JSON.stringify({ ...names(), [key]: project.name }));
  }
  const list = keys().filter((k) => k !== key);
  list.push(key);
  saveKeys(list);
  sessionStorage.setItem(CURRENT, key);
  input.value = '';
  state.filters = [];
  showSignedIn();
}

function showSignedIn() {
  const list = keys();
  const current = currentKey();
  const signedIn = list.length > 0 && current;
  $('#signin').hidden = Boolean(signedIn);
  $('#signin-cancel').hidden = !signedIn;
  $('#dash').hidden = !signedIn;
  $('#project-box').hidden = !signedIn;
  const select = $('#project');
  select.replaceChildren(
    ...list.map((k) => {
      const o = document.createElement('option');
      o.value = k;
      o.textContent = keyLabel(k);
      o.selected = k === current;
      return o;
    }),
  );
  if (signedIn) {
    load();
    startLive();
  } else stopLive();
}

// ---- live view (Server-Sent Events) -----------------------------------------------------

// EventSource cannot send an Authorization header: the read key goes in `?key=`, same-origin.
const LIVE_ROWS = 50;
const live = { source: null, key: null, ids: new Set() };

function setLiveState(text) {
  const el = $('#live-state');
  el.dataset.liveState = text;
  el.textContent = { connecting: 'connecting…', open: '● live', reconnecting: 'reconnecting…', closed: 'stopped' }[text] || '';
}
function parseData(m) {
  try {
    return JSON.parse(m.data);
  } catch {
    return null;
  }
}
function stopLive() {
  live.source?.close();
  live.source = null;
  live.key = null;
  setLiveState('idle');
}
function startLive() {
  const key = currentKey();
  if (!key || (live.source && live.key === key)) return;
  stopLive();
  live.key = key;
  const es = new EventSource(`/v1/stats/live?key=${encodeURIComponent(key)}`);
  live.source = es;
  setLiveState('connecting');
  es.addEventListener('open', () => setLiveState('open'));
  es.addEventListener('error', () => setLiveState(es.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting'));
  es.addEventListener('snapshot', (m) => {
    const s = parseData(m);
    if (!s) return;
    $('[data-live="visitors"]').textContent = String(s.visitors);
    live.ids = new Set();
    const ol = document.querySelector('[data-list="live"]');
    ol.replaceChildren();
    // Newest first in the snapshot: add the oldest first so each goes on top.
    for (const e of s.events.slice().reverse()) addLive(e);
    if (!s.events.length) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = 'No events in the last 30 minutes';
      ol.append(li);
    }
  });
  es.addEventListener('event', (m) => {
    const e = parseData(m);
    if (e) addLive(e);
  });
  es.addEventListener('visitors', (m) => {
    const v = parseData(m);
    if (v) $('[data-live="visitors"]').textContent = String(v.visitors);
  });
  es.addEventListener('lagged', () => setLiveState('open'));
}

/** Puts one event on top of the live list (once per id), keeping the newest LIVE_ROWS. */
function addLive(e) {
  if (live.ids.has(e.id)) return;
  live.ids.add(e.id);
  const ol = document.querySelector('[data-list="live"]');
  ol.querySelector('li.empty')?.remove();
  const li = document.createElement('li');
  li.dataset.key = e.id;
  li.dataset.value = e.name;
  const time = document.createElement('time');
  time.dateTime = e.time;
  time.textContent = new Date(e.time).toLocaleTimeString();
  const name = document.createElement('span');
  name.className = 'key';
  name.textContent = e.path ? `${e.name} · ${e.path}` : e.name;
  const who = document.createElement('span');
  who.className = 'value';
  who.textContent = [e.browser, e.country].filter(Boolean).join(' · ');
  li.append(time, name, who);
  ol.prepend(li);
  while (ol.children.length > LIVE_ROWS) ol.lastElementChild.remove();
}

// ---- range and filters ------------------------------------------------------------------

function isoDay(ms) {
  return new Date(ms).toISOString().slice(0, 10);
}
function startOfTodayUtc() {
  const n = new Date();
  return Date.UTC(n.getUTCFullYear(), n.getUTCMonth(), n.getUTCDate());
}

/** The range as `YYYY-MM-DD` (UTC) `from` and exclusive `to`, or null when not valid. */
function range() {
  const today = startOfTodayUtc();
  const choice = $('#range').value;
  if (choice === 'custom') {
    const from = Date.parse($('#from').value);
    const to = Date.parse($('#to').value);
    if (Number.isNaN(from) || Number.isNaN(to) || to < from) return null;
    return { from: isoDay(from), to: isoDay(to + DAY) };
  }
  const days = { today: 1, '7d': 7, '30d': 30 }[choice] || 30;
  return { from: isoDay(today - (days - 1) * DAY), to: isoDay(today + DAY) };
}

function addFilter(name, value) {
  if (state.filters.some(([n, v]) => n === name && v === value)) return;
  state.filters = state.filters.filter(([n]) => n !== name);
  state.filters.push([name, value]);
  load();
}

function renderFilters() {
  $('#filters').replaceChildren(
    ...state.filters.map(([name, value]) => {
      const li = document.createElement('li');
      li.className = 'chip';
      li.dataset.filter = name;
      li.dataset.value = value;
      const label = document.createElement('span');
      label.textContent = `${name}: ${value}`;
      const remove = document.createElement('button');
      remove.type = 'button';
      remove.textContent = '×';
      remove.setAttribute('aria-label', `Remove filter ${name} ${value}`);
      remove.addEventListener('click', () => {
        state.filters = state.filters.filter(([n, v]) => !(n === name && v === value));
        load();
      });
      li.append(label, remove);
      return li;
    }),
  );
}

// ---- API --------------------------------------------------------------------------------

function api(path, key, params) {
  return fetch(`${path}?${params}`, {
    headers: { Authorization: `Bearer ${key}` },
    credentials: 'omit',
    cache: 'no-store',
  });
}
/**
 * What to tell the user about a failed answer: the API's own message for a refused request
 * (4xx: our words about the query), never a server error's text (it may carry the database's).
 */
async function errorText(r) {
  if (r.status >= 500) {
    return 'the collector or its database is busy or unavailable; try again in a moment';
  }
  try {
    const body = await r.json();
    return body.message || body.error || '';
  } catch {
    return '';
  }
}
async function json(path, key, params) {
  const r = await api(path, key, params);
  if (!r.ok) {
    const e = new Error(r.status === 401 ? 'unknown key' : `${r.status} ${await errorText(r)}`);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

async function load() {
  const key = currentKey();
  const dash = $('#dash');
  renderFilters();
  const rng = range();
  if (!key || !rng) {
    if (!rng) $('#status').textContent = 'Choose a valid range (From on or before To).';
    return;
  }
  const id = ++state.loadId;
  const params = new URLSearchParams(rng);
  for (const [n, v] of state.filters) params.append(n, v);
  dash.dataset.state = 'loading';
  dash.setAttribute('aria-busy', 'true');
  $('#status').textContent = 'Loading…';
  const lists = Object.entries(LISTS).map(([list, [by]]) => {
    const p = new URLSearchParams(params);
    p.set('by', by);
    return json('/v1/stats/breakdown', key, p).then((b) => [list, b.rows]);
  });
  const props =
    state.propEvent && state.prop
      ? (() => {
          const p = new URLSearchParams(params);
          p.set('event', state.propEvent);
          p.set('by', `prop:${state.prop}`);
          return json('/v1/stats/breakdown', key, p).then((b) => b.rows, (e) => ({ error: e.message }));
        })()
      : Promise.resolve(null);
  const funnel = state.funnel
    ? (() => {
        const p = new URLSearchParams(params);
        p.set('steps', state.funnel);
        return json('/v1/stats/funnel', key, p).catch((e) => ({ error: e.message }));
      })()
    : Promise.resolve(null);
  const health = json('/v1/stats/health', key, new URLSearchParams(rng)).catch((e) => ({ error: e.message }));
  try {
    const [summary, series, propRows, funnelAnswer, healthAnswer, ...rows] = await Promise.all([
      json('/v1/stats/summary', key, params),
      json('/v1/stats/timeseries', key, params),
      props,
      funnel,
      health,
      ...lists,
    ]);
    if (id !== state.loadId) return;
    renderSummary(summary);
    renderChart(series);
    for (const [list, r] of rows) renderList(list, r);
    renderProps(propRows);
    renderFunnel(funnelAnswer);
    renderHealth(healthAnswer);
    dash.dataset.from = rng.from;
    dash.dataset.to = rng.to;
    dash.dataset.query = params.toString();
    dash.dataset.state = 'ready';
    $('#status').textContent = `${summary.from.slice(0, 10)} to ${summary.to.slice(0, 10)} (UTC, end excluded)${
      state.filters.length ? `, ${state.filters.length} filter(s)` : ''
    }`;
  } catch (e) {
    if (id !== state.loadId) return;
    dash.dataset.state = 'error';
    $('#status').textContent = e.status === 401 ? 'Unknown key: this key no longer reads a project.' : `Could not load: ${e.message}`;
  } finally {
    if (id === state.loadId) dash.removeAttribute('aria-busy');
  }
}

// ---- rendering --------------------------------------------------------------------------

/** A number as the text tests read back: integers as they are, floats to 2 decimals. */
function plain(n) {
  return String(Math.round(n * 100) / 100);
}

function renderSummary(s) {
  for (const m of METRICS) {
    const el = document.querySelector(`[data-metric="${m}"]`);
    el.textContent = plain(s[m]);
    el.dataset.value = String(s[m]);
  }
  $('#bounce-hint').textContent = `(${plain(s.bounce_rate * 100)}%)`;
  const secs = Math.round(s.avg_session_seconds);
  $('#session-hint').textContent = `(${Math.floor(secs / 60)}m ${secs % 60}s)`;
}

function renderList(list, rows) {
  const [, filter, value] = LISTS[list];
  fillList(document.querySelector(`[data-list="${list}"]`), rows, value, (row) => {
    if (list === 'events') {
      state.propEvent = row.key;
      $('#prop-event').textContent = `“${row.key}”`;
      $('#prop-form').hidden = false;
    }
    addFilter(filter, row.key);
  }, filter);
}

/** Rows as `<li data-key data-value>`, with a bar; `onPick` (if any) makes the key a button. */
function fillList(ol, rows, value, onPick, filter) {
  if (!rows.length) {
    const li = document.createElement('li');
    li.className = 'empty';
    li.textContent = 'No data';
    ol.replaceChildren(li);
    return;
  }
  const max = Math.max(1, ...rows.map((r) => r[value]));
  ol.replaceChildren(
    ...rows.map((row) => {
      const li = document.createElement('li');
      li.dataset.key = row.key;
      li.dataset.value = String(row[value]);
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.width = `${(100 * row[value]) / max}%`;
      const k = document.createElement(onPick ? 'button' : 'span');
      k.className = 'key';
      k.textContent = row.key;
      if (onPick) {
        k.type = 'button';
        k.title = `Filter by ${filter} ${row.key}`;
        k.addEventListener('click', () => onPick(row));
      }
      const n = document.createElement('span');
      n.className = 'value';
      n.textContent = String(row[value]);
      li.append(bar, k, n);
      return li;
    }),
  );
}

/** The breakdown of the picked event by one of its props (event counts; not a filter). */
function renderProps(rows) {
  const ol = document.querySelector('[data-list="props"]');
  if (rows && rows.error) {
    const li = document.createElement('li');
    li.className = 'empty error';
    li.textContent = rows.error;
    ol.replaceChildren(li);
  } else if (rows) fillList(ol, rows, 'events', null);
  else ol.replaceChildren();
}

/** The steps of the funnel form as `steps=` text (empty rows skipped), or an error. */
function funnelSteps() {
  const steps = [];
  for (let i = 1; i <= 5; i++) {
    const value = document.querySelector(`[data-step-value="${i}"]`).value.trim();
    if (!value) continue;
    if (value.includes(',')) return { error: `Step ${i}: a step cannot contain a comma.` };
    steps.push(`${document.querySelector(`[data-step-kind="${i}"]`).value}:${value}`);
  }
  if (steps.length < 2) return { error: 'A funnel needs at least two steps.' };
  return { steps: steps.join(',') };
}

/** One row per step: sessions (`data-value`), visitors, and the conversion from the step before. */
function renderFunnel(answer) {
  const ol = document.querySelector('[data-list="funnel"]');
  $('#funnel-error').textContent = answer && answer.error ? `Could not load the funnel: ${answer.error}` : '';
  if (!answer || answer.error) {
    ol.replaceChildren();
    return;
  }
  const first = Math.max(1, answer.steps[0]?.sessions || 0);
  ol.replaceChildren(
    ...answer.steps.map((s, i) => {
      const li = document.createElement('li');
      li.dataset.key = s.step;
      li.dataset.value = String(s.sessions);
      li.dataset.conversion = String(s.conversion);
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.width = `${(100 * s.sessions) / first}%`;
      const k = document.createElement('span');
      k.className = 'key';
      k.textContent = `${i + 1}. ${s.step}`;
      const n = document.createElement('span');
      n.className = 'value';
      n.textContent = `${s.sessions} sessions · ${s.visitors} visitors${i ? ` · ${plain(s.conversion * 100)}% of step ${i}` : ''}`;
      li.append(bar, k, n);
      return li;
    }),
  );
}

const HEALTH = ['accepted', 'duplicates', 'rejected', 'sdk_dropped', 'rate_limited'];
const HEALTH_FIGURES = [...HEALTH, 'batches_rejected'];

/** Ingest health: totals, rejections by reason, the hours (newest first, at most 48). */
function renderHealth(h) {
  const cell = (name) => document.querySelector(`[data-health="${name}"]`);
  if (!h || h.error) {
    for (const name of [...HEALTH_FIGURES, 'queue_depth', 'last_commit']) cell(name).textContent = '–';
    document.getElementById('queue-lag').hidden = true;
    document.querySelector('[data-list="rejected"]').replaceChildren();
    document.querySelector('[data-list="health"]').replaceChildren();
    return;
  }
  for (const name of HEALTH_FIGURES) cell(name).textContent = String(h.totals[name]);
  cell('queue_depth').textContent = String(h.queue_depth);
  cell('last_commit').textContent = h.last_commit ? h.last_commit.replace('T', ' ').slice(0, 19) + ' UTC' : 'none yet';
  // With `serve --queue`: what the sinks have not committed yet (all projects).
  const lag = h.queue_lag;
  document.getElementById('queue-lag').hidden = !lag;
  cell('queue_lag').textContent = lag
    ? `${lag.stream_messages} batches, oldest ${Math.round(lag.oldest_pending_secs)} s`
    : '';
  // Events by reason, then whole batches (`batch:<code>`).
  const reasons = [
    ...Object.entries(h.totals.rejected_by_reason),
    ...Object.entries(h.totals.batches_rejected_by_reason).map(([code, n]) => [`batch:${code}`, n]),
  ]
    .map(([key, n]) => ({ key, events: n }))
    .sort((a, b) => b.events - a.events);
  fillList(document.querySelector('[data-list="rejected"]'), reasons, 'events', null);
  document.querySelector('[data-list="health"]').replaceChildren(
    ...h.hours
      .slice(-48)
      .reverse()
      .map((hour) => {
        const tr = document.createElement('tr');
        tr.dataset.key = hour.t;
        tr.dataset.value = String(hour.accepted);
        const th = document.createElement('th');
        th.scope = 'row';
        th.textContent = hour.t.slice(0, 13).replace('T', ' ') + ':00';
        tr.append(th);
        for (const name of HEALTH) {
          const td = document.createElement('td');
          td.textContent = String(hour[name]);
          tr.append(td);
        }
        return tr;
      }),
  );
}

/** A CSS custom property of the page (the colours follow light and dark mode). */
function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/**
 * uPlot's options and data for a /v1/stats/timeseries answer: visitors and page views, and
 * the previous period (dashed) drawn over the same x positions, bucket by bucket.
 */
export function chartSpec(series, { width, height }) {
  const cur = series.buckets;
  const prev = series.previous?.buckets || [];
  const xs = cur.map((b) => Date.parse(b.t) / 1000);
  const at = (buckets, k) => cur.map((_, i) => (i < buckets.length ? buckets[i][k] : null));
  const [accent, accent2, muted, line] = ['--accent', '--accent-2', '--muted', '--line'].map(cssVar);
  const hourly = series.interval === 'hour';
  const axis = { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
  const opts = {
    width,
    height,
    // Buckets are UTC hours or days: label them in UTC.
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC'),
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    axes: [
      { ...axis, values: hourly ? '{HH}:{mm}' : '{MM}-{DD}' },
      { ...axis, size: 44, values: (u, ticks) => ticks.map((v) => (Number.isInteger(v) ? String(v) : '')) },
    ],
    series: [
      { value: hourly ? '{YYYY}-{MM}-{DD} {HH}:{mm} UTC' : '{YYYY}-{MM}-{DD}' },
      { label: 'Visitors', stroke: accent, width: 2 },
      { label: 'Page views', stroke: accent2, width: 2 },
      { label: 'Visitors (previous)', stroke: accent, width: 1.5, dash: [5, 4], alpha: 0.55 },
      { label: 'Page views (previous)', stroke: accent2, width: 1.5, dash: [5, 4], alpha: 0.55 },
    ],
  };
  const data = [xs, at(cur, 'visitors'), at(cur, 'pageviews'), at(prev, 'visitors'), at(prev, 'pageviews')];
  return { opts, data };
}

/** Drawn at the container's own width (again on resize and on a colour scheme change). */
function renderChart(series) {
  state.series = series;
  const box = $('#chart');
  const width = Math.max(280, Math.round(box.clientWidth || 960));
  const height = Math.round(Math.min(260, Math.max(170, width * 0.28)));
  const { opts, data } = chartSpec(series, { width, height });
  state.chart?.destroy();
  box.replaceChildren();
  state.chart = new uPlot(opts, data, box);
  const cur = series.buckets;
  const total = (k) => cur.reduce((a, b) => a + b[k], 0);
  box.setAttribute(
    'aria-label',
    `Visitors and page views per ${series.interval} from ${series.from.slice(0, 10)} to ${series.to.slice(0, 10)}: ${total('pageviews')} page views in all, at most ${Math.max(0, ...cur.map((b) => b.visitors))} visitors in one ${series.interval}`,
  );
  box.dataset.points = String(cur.length);
  box.dataset.series = opts.series.slice(1).map((s) => s.label).join(',');
  box.dataset.pageviews = String(total('pageviews'));
}

// ---- wiring -----------------------------------------------------------------------------

function init() {
  $('#signin-form').addEventListener('submit', signIn);
  $('#project').addEventListener('change', (e) => {
    sessionStorage.setItem(CURRENT, e.target.value);
    state.filters = [];
    state.propEvent = null;
    $('#prop-form').hidden = true;
    load();
    startLive();
  });
  $('#add-key').addEventListener('click', () => {
    $('#signin').hidden = false;
    $('#signin-cancel').hidden = false;
    $('#key').focus();
  });
  $('#signin-cancel').addEventListener('click', () => {
    $('#signin').hidden = true;
    $('#signin-error').textContent = '';
  });
  $('#sign-out').addEventListener('click', () => {
    const k = currentKey();
    saveKeys(keys().filter((x) => x !== k));
    sessionStorage.removeItem(CURRENT);
    state.filters = [];
    showSignedIn();
  });
  $('#range').addEventListener('change', () => {
    const custom = $('#range').value === 'custom';
    $('#custom-range').hidden = !custom;
    if (custom) {
      if (!$('#to').value) $('#to').value = isoDay(startOfTodayUtc());
      if (!$('#from').value) $('#from').value = isoDay(startOfTodayUtc() - 29 * DAY);
    }
    load();
  });
  $('#apply-range').addEventListener('click', load);
  $('#funnel-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const f = funnelSteps();
    if (f.error) {
      $('#funnel-error').textContent = f.error;
      return;
    }
    state.funnel = f.steps;
    load();
  });
  $('#prop-form').addEventListener('submit', (e) => {
    e.preventDefault();
    state.prop = $('#prop').value.trim();
    load();
  });
  let resizing;
  const redraw = () => state.series && !$('#dash').hidden && renderChart(state.series);
  window.addEventListener('resize', () => {
    clearTimeout(resizing);
    resizing = setTimeout(redraw, 150);
  });
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', redraw);
  showSignedIn();
}

init();
