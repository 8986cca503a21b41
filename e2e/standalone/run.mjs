#!/usr/bin/env node
// End-to-end check of ssegate's foundations (and poll mode), without Kubernetes.
//
// Starts the release example backend on a free port, and the release ssegate on a copy of
// manifests/examples (the example backend's EndpointSlice moved to that port) with its
// proxy and admin listeners on free ports, waits for /readyz, then streams through ssegate
// with curl, headless Chromium's EventSource and the `eventsource` npm package, and finally
// checks /metrics.
//
//   cargo build --release --bin ssegate --example sse-backend
//   npm ci --prefix e2e
//   node e2e/standalone/run.mjs            # or: scripts/test
//
// Environment (all optional):
//   SSEGATE_E2E_LISTEN   ssegate's proxy address   (default 127.0.0.1:<free port>)
//   SSEGATE_E2E_ADMIN    ssegate's admin address   (default 127.0.0.1:<free port>)
//   SSEGATE_E2E_BACKEND  backend address           (default 127.0.0.1:<free port>)
//   (--listen-tls is always on a free port: the checks do not use it)
//   SSEGATE_E2E_CONFIG   config directory to copy  (default manifests/examples; its
//                        backend.yaml is moved to the backend's port)
//   SSEGATE_E2E_TIMEOUT  overall timeout in seconds (default 90)
//   CHROMIUM             browser binary (default /usr/bin/chromium)
//   CARGO_TARGET_DIR     where the release binaries are (default <repo>/target)
//
// `--direct` skips ssegate and points every client at the backend itself. It
// only exists to debug the harness; it is NOT a test of ssegate.

import { execFile } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import path from 'node:path';
import { EventSource as NodeEventSource } from 'eventsource';
import {
  BACKEND_BIN, CheckError, Processes, REPO, SSEGATE_BIN, Skip, assert, assertBuilt, copyExampleConfig,
  freePorts, launchChromium, logger, runSuite, waitFor200,
} from '../lib.mjs';

const SOURCE_CONFIG = path.resolve(REPO, process.env.SSEGATE_E2E_CONFIG || 'manifests/examples');
const WORK = path.join(REPO, 'e2e', '.work', 'standalone');
const CONFIG_DIR = path.join(WORK, 'config');

const [backendPort, listenPort, adminPort, tlsPort] = await freePorts(4);
const LISTEN = process.env.SSEGATE_E2E_LISTEN || `127.0.0.1:${listenPort}`;
const ADMIN = process.env.SSEGATE_E2E_ADMIN || `127.0.0.1:${adminPort}`;
const BACKEND = process.env.SSEGATE_E2E_BACKEND || `127.0.0.1:${backendPort}`;
// Not used by the checks, but bound (its default, 0.0.0.0:8443, would collide).
const LISTEN_TLS = `127.0.0.1:${tlsPort}`;
const TIMEOUT_S = Number(process.env.SSEGATE_E2E_TIMEOUT || 90);
const DIRECT = process.argv.includes('--direct');

const BASE = `http://${DIRECT ? BACKEND : LISTEN}`;
const ADMIN_BASE = `http://${ADMIN}`;

const log = logger('standalone');
const procs = new Processes(WORK, log);
let browser = null;

// ---------------------------------------------------------------- utilities

/** Runs `fn` with a deadline; rejects with a clear message when it passes. */
async function withTimeout(ms, what, fn) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new CheckError(`${what}: timed out after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([fn(), deadline]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------- SSE helpers

/** Parses an event-stream text into blocks of fields (for curl's output). */
function parseEventStream(text) {
  const blocks = [];
  for (const raw of text.replace(/\r\n?/g, '\n').split('\n\n')) {
    if (!raw.trim()) continue;
    const fields = {};
    for (const line of raw.split('\n')) {
      if (line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const key = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      fields[key] = fields[key] === undefined ? value : `${fields[key]}\n${value}`;
    }
    blocks.push(fields);
  }
  return blocks;
}

/**
 * Opens an EventSource and collects `tick` events until the source is CLOSED
 * (the backend answers 204 once `count` is reached) or `timeoutMs` passes.
 * Runs both inside Chromium (page.evaluate; `ES` is then undefined and the
 * page's own EventSource is used) and in Node (with the npm package), so it
 * must stay self-contained.
 */
function collectEvents({ url, timeoutMs }, ES) {
  const Impl = ES || globalThis.EventSource;
  return new Promise((resolve) => {
    const events = [];
    const errorStates = [];
    let opens = 0;
    const es = new Impl(url);
    const finish = (timedOut) => {
      clearTimeout(timer);
      const readyState = es.readyState;
      es.close();
      resolve({ events, opens, errorStates, readyState, timedOut });
    };
    const timer = setTimeout(() => finish(true), timeoutMs);
    es.onopen = () => { opens += 1; };
    es.onmessage = (e) => events.push({ type: 'message', id: e.lastEventId, data: e.data });
    es.addEventListener('tick', (e) => events.push({ type: e.type, id: e.lastEventId, data: e.data }));
    es.onerror = () => {
      errorStates.push(es.readyState);
      if (es.readyState === 2) finish(false);
    };
  });
}

/** Asserts that `result` holds ticks 1..count exactly once, in order, and ended CLOSED. */
function checkCollected(result, count, { minOpens = 1 } = {}) {
  const ids = result.events.map((e) => e.id);
  const shown = ids.length > 40 ? `${ids.slice(0, 40).join(',')},... (${ids.length} events)` : ids.join(',');
  const summary = `ids=[${shown}] opens=${result.opens} errors(readyState)=[${result.errorStates}] ` +
    `readyState=${result.readyState}${result.timedOut ? ' TIMED OUT' : ''}`;
  const expected = Array.from({ length: count }, (_, i) => String(i + 1));
  assert(!result.timedOut, `stream did not end with readyState CLOSED in time; ${summary}`);
  assert(ids.join(',') === expected.join(','), `expected ids 1..${count} once each in order; ${summary}`);
  for (const e of result.events) {
    assert(e.type === 'tick', `event ${e.id} has type ${e.type}, expected tick; ${summary}`);
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      throw new CheckError(`event ${e.id} data is not JSON: ${JSON.stringify(e.data)}`);
    }
    assert(String(data.n) === e.id && /^\d+$/.test(data.time), `event ${e.id} has bad data ${e.data}`);
  }
  assert(result.readyState === 2, `readyState ended ${result.readyState}, expected 2 (CLOSED); ${summary}`);
  assert(result.opens >= minOpens, `expected at least ${minOpens} connection(s) (reconnects), got ${result.opens}; ${summary}`);
  return summary;
}

function curl(args, timeoutMs) {
  return new Promise((resolve) => {
    execFile('curl', args, { timeout: timeoutMs, maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (err.code ?? err.signal) : 0, stdout, stderr });
    });
  });
}

// ---------------------------------------------------------------- checks

let delivered = 0; // events that went through ssegate, for the /metrics check

const checks = [];
function check(name, fn) {
  checks.push({ name, fn });
}

check('curl streams ids 1..5 (query string and SSE fields pass through)', async () => {
  const started = Date.now();
  const url = `${BASE}/events?interval=50ms&count=5`;
  const { code, stdout, stderr } = await curl(['-sN', '--max-time', '5', url], 8000);
  const took = Date.now() - started;
  // count=5 makes the backend end the stream; if the query string were lost
  // the stream would run on at 1/s until --max-time (exit 28).
  assert(code === 0, `curl ${url} exited ${code} after ${took} ms ${stderr}\n${stdout}`);
  assert(took < 4000, `curl took ${took} ms for 5 events at 50ms`);
  assert(/^retry: 1000$/m.test(stdout), `no "retry: 1000" line in:\n${stdout}`);
  const blocks = parseEventStream(stdout).filter((b) => b.id !== undefined);
  const ids = blocks.map((b) => b.id);
  assert(ids.join(',') === '1,2,3,4,5', `expected ids 1..5 in order, got [${ids}] in:\n${stdout}`);
  assert(blocks.every((b) => b.event === 'tick'), `not every event is "event: tick":\n${stdout}`);
  delivered += 5;
});

check('curl resumes after Last-Event-ID: 3 and gets 204 at the end', async () => {
  const url = `${BASE}/events?interval=50ms&count=5`;
  const resumed = await curl(['-sN', '--max-time', '5', '-H', 'Last-Event-ID: 3', url], 8000);
  const ids = parseEventStream(resumed.stdout).filter((b) => b.id !== undefined).map((b) => b.id);
  assert(resumed.code === 0 && ids.join(',') === '4,5',
    `expected ids 4,5 (curl exit ${resumed.code}), got [${ids}] in:\n${resumed.stdout}`);
  delivered += 2;
  const done = await curl(['-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '5',
    '-H', 'Last-Event-ID: 5', url], 8000);
  assert(done.stdout === '204', `expected 204 for Last-Event-ID: 5 of count=5, got ${done.stdout} (exit ${done.code})`);
});

async function newPage() {
  if (!browser) browser = await launchChromium();
  const page = await browser.newPage();
  // Any document on the proxy's origin will do (a 404 is fine): it makes
  // EventSource('/events...') same-origin, so no CORS is involved.
  await page.goto(`${BASE}/e2e-page-does-not-exist`, { timeout: 10000 });
  return page;
}

check('Chromium EventSource: 20 events once each in order, then 204 closes it', async () => {
  const page = await newPage();
  try {
    const result = await page.evaluate(collectEvents, { url: '/events?interval=50ms&count=20', timeoutMs: 10000 });
    log(`  ${checkCollected(result, 20)}`);
    delivered += 20;
  } finally {
    await page.close();
  }
});

check('Chromium EventSource reconnects with Last-Event-ID (count=6, cut=3)', async () => {
  const page = await newPage();
  try {
    const result = await page.evaluate(collectEvents, { url: '/events?interval=50ms&count=6&cut=3', timeoutMs: 10000 });
    log(`  ${checkCollected(result, 6, { minOpens: 2 })}`);
    delivered += 6;
  } finally {
    await page.close();
  }
});

check('eventsource (npm): 20 events once each in order, then 204 closes it', async () => {
  const result = await collectEvents({ url: `${BASE}/events?interval=50ms&count=20`, timeoutMs: 10000 }, NodeEventSource);
  log(`  ${checkCollected(result, 20)}`);
  delivered += 20;
});

check('eventsource (npm) reconnects with Last-Event-ID (count=6, cut=3)', async () => {
  const result = await collectEvents({ url: `${BASE}/events?interval=50ms&count=6&cut=3`, timeoutMs: 10000 }, NodeEventSource);
  log(`  ${checkCollected(result, 6, { minOpens: 2 })}`);
  delivered += 6;
});

/** Sums the samples of one metric family in Prometheus text format. */
function sumMetric(text, name) {
  let sum = 0;
  const series = [];
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m && m[1] === name) {
      sum += Number(m[3]);
      series.push(`${m[1]}${m[2] || ''} ${m[3]}`);
    }
  }
  return { sum, series };
}

// ---------------------------------------------------------------- poll mode
// The `orders` route of manifests/examples turns the backend's JSON endpoint
// /api/orders into an event stream (mode: Poll, eventType: tick, endEvent: true).

check('poll: curl gets batches as tick events, the cursor as id on the last of each, then end', async () => {
  const url = `${BASE}/poll?wait=50ms&count=5&batch=2`;
  const { code, stdout, stderr } = await curl(['-sN', '--max-time', '8', url], 10000);
  assert(code === 0, `curl ${url} exited ${code} ${stderr}\n${stdout}`);
  const blocks = parseEventStream(stdout);
  const ticks = blocks.filter((b) => b.event === 'tick');
  const ns = ticks.map((b) => JSON.parse(b.data).n);
  assert(ns.join(',') === '1,2,3,4,5', `expected orders 1..5 in order, got [${ns}] in:\n${stdout}`);
  const ids = ticks.map((b) => b.id ?? '');
  assert(ids.join(',') === ',2,,4,5', `expected ids only on batch ends (,2,,4,5), got [${ids}] in:\n${stdout}`);
  const last = blocks[blocks.length - 1];
  assert(last.event === 'end', `expected a final "event: end" block, got ${JSON.stringify(last)} in:\n${stdout}`);
  delivered += 5;
});

check('poll: curl with Last-Event-ID: 3 resumes at order 4; Last-Event-ID: 5 gets 204', async () => {
  const url = `${BASE}/poll?wait=50ms&count=5`;
  const resumed = await curl(['-sN', '--max-time', '8', '-H', 'Last-Event-ID: 3', url], 10000);
  const ns = parseEventStream(resumed.stdout).filter((b) => b.event === 'tick').map((b) => JSON.parse(b.data).n);
  assert(resumed.code === 0 && ns.join(',') === '4,5',
    `expected orders 4,5 (curl exit ${resumed.code}), got [${ns}] in:\n${resumed.stdout}`);
  delivered += 2;
  const done = await curl(['-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '5',
    '-H', 'Last-Event-ID: 5', url], 8000);
  assert(done.stdout === '204', `expected 204 for Last-Event-ID: 5 of count=5, got ${done.stdout} (exit ${done.code})`);
});

check('poll: Chromium EventSource reads 8 orders once each in order, then 204 closes it', async () => {
  const page = await newPage();
  try {
    const result = await page.evaluate(collectEvents, { url: '/poll?wait=50ms&count=8', timeoutMs: 20000 });
    // The stream ends after order 8 (continue: false); the automatic reconnect carries
    // Last-Event-ID: 8 and gets 204, which closes the EventSource.
    log(`  ${checkCollected(result, 8)}`);
    delivered += 8;
  } finally {
    await page.close();
  }
});

check('poll: Chromium EventSource reconnects and resumes at the right cursor (count=6, cut=3)', async () => {
  const page = await newPage();
  try {
    const result = await page.evaluate(collectEvents, { url: '/poll?wait=50ms&count=6&cut=3', timeoutMs: 20000 });
    // Cut after order 3: the reconnect must ask for previous=3 and get 4, 5, 6 (no loss,
    // no replay); then 204 closes it.
    log(`  ${checkCollected(result, 6, { minOpens: 2 })}`);
    delivered += 6;
  } finally {
    await page.close();
  }
});

check('poll: /metrics counts the poll calls', async () => {
  if (DIRECT) {
    throw new Skip('--direct mode: there is no ssegate to ask');
  }
  const res = await fetch(`${ADMIN_BASE}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  const ok = sumMetric(text, 'ssegate_poll_requests_total');
  const success = ok.series.filter((s) => s.includes('outcome="success"') && s.includes('route="demo/orders"'));
  assert(success.length === 1 && Number(success[0].split(' ').pop()) > 0,
    `no ssegate_poll_requests_total{outcome="success",route="demo/orders"} > 0 in:\n${ok.series.join('\n')}`);
  log(`  ${ok.series.join('; ')}`);
});

check('/metrics counts the events and connections', async () => {
  if (DIRECT) {
    throw new Skip('--direct mode: there is no ssegate to ask');
  }
  const res = await fetch(`${ADMIN_BASE}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  assert(res.status === 200, `/metrics answered ${res.status}`);
  const events = sumMetric(text, 'ssegate_events_total');
  const conns = sumMetric(text, 'ssegate_connections_total');
  log(`  delivered through ssegate: ${delivered}; ${events.series.join('; ') || 'no ssegate_events_total'}; ` +
    `${conns.series.join('; ') || 'no ssegate_connections_total'}`);
  assert(events.series.some((s) => /route="[^"]+"/.test(s)),
    `no ssegate_events_total{route="..."} series in /metrics:\n${text.slice(0, 2000)}`);
  assert(events.sum >= delivered, `ssegate_events_total sums to ${events.sum}, fewer than the ${delivered} events delivered`);
  assert(conns.sum > 0, `ssegate_connections_total is ${conns.sum}, expected > 0`);
});

// ---------------------------------------------------------------- main

async function main() {
  assertBuilt(DIRECT ? [BACKEND_BIN] : [BACKEND_BIN, SSEGATE_BIN]);
  if (!DIRECT) {
    assert(existsSync(SOURCE_CONFIG), `no ${path.relative(REPO, SOURCE_CONFIG)}/`);
    rmSync(WORK, { recursive: true, force: true });
    copyExampleConfig(SOURCE_CONFIG, CONFIG_DIR, Number(BACKEND.slice(BACKEND.lastIndexOf(':') + 1)));
  }

  const backend = procs.start('sse-backend', BACKEND_BIN, ['--listen', BACKEND]);
  await waitFor200(`http://${BACKEND}/healthz`, backend, 10000);
  if (DIRECT) {
    log(`--direct: clients talk to the backend at ${BASE}; ssegate is NOT tested`);
  } else {
    const gate = procs.start('ssegate', SSEGATE_BIN, ['run', '--config', CONFIG_DIR, '--listen', LISTEN, '--admin', ADMIN,
      '--listen-tls', LISTEN_TLS]);
    await waitFor200(`${ADMIN_BASE}/readyz`, gate, 30000);
    log(`ssegate ready: proxy ${BASE}, admin ${ADMIN_BASE}`);
  }

  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const { name, fn } of checks) {
    const started = Date.now();
    try {
      await withTimeout(30000, name, fn);
      passed += 1;
      log(`ok   - ${name} (${Date.now() - started} ms)`);
    } catch (err) {
      if (err instanceof Skip) {
        skipped += 1;
        log(`skip - ${name}: ${err.message}`);
        continue;
      }
      failed += 1;
      log(`FAIL - ${name} (${Date.now() - started} ms)\n${err instanceof CheckError ? err.message : err.stack}`);
    }
  }
  if (failed) procs.logTails();
  console.log(`standalone: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
  return failed === 0;
}

const ok = await runSuite({
  log,
  procs,
  main,
  timeoutMs: TIMEOUT_S * 1000,
  cleanup: async () => { if (browser) await browser.close().catch(() => {}); },
});
process.exit(ok ? 0 : 1);
