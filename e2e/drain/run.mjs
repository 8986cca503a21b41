#!/usr/bin/env node
// End-to-end check of the graceful drain on SIGTERM, with the real release binary and real
// clients (curl -N and the `eventsource` npm package).
//
// Starts the release example backend and ssegate (--drain-delay 2s, --drain-window 4s,
// --grace-period 20s) on a route to it, opens streams with curl and EventSource, sends
// ssegate SIGTERM and checks:
//   - /readyz fails at once (503);
//   - a new stream is still accepted during the drain delay;
//   - every stream's last bytes are a `retry:` hint (after its last event), then it ends
//     cleanly, and the EventSource clients wait that long before reconnecting;
//   - the ends are spread over the window, not all at once, and none comes before the delay;
//   - the process exits with status 0, well before the grace period.
//
//   cargo build --release --bin ssegate --example sse-backend
//   npm ci --prefix e2e
//   node e2e/drain/run.mjs            # or: scripts/test
//
// The backend, proxy and admin listeners are on free loopback ports the OS picks at run time.
// Environment (all optional):
//   SSEGATE_E2E_DRAIN_PORTS  three ports to use instead: backend, proxy, admin
//   CARGO_TARGET_DIR         where the release binaries are (default <repo>/target)

import { spawn } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { EventSource } from 'eventsource';
import {
  BACKEND_BIN, Processes, REPO, SSEGATE_BIN, assert, assertBuilt, freePorts, logger, sleep, status, tail,
  runSuite, waitFor200,
} from '../lib.mjs';

const WORK = path.join(REPO, 'e2e', '.work', 'drain');
const [BACKEND_PORT, PROXY_PORT, ADMIN_PORT] = process.env.SSEGATE_E2E_DRAIN_PORTS
  ? process.env.SSEGATE_E2E_DRAIN_PORTS.split(',').map(Number)
  : await freePorts(3);
const BACKEND = `127.0.0.1:${BACKEND_PORT}`;
const PROXY = `127.0.0.1:${PROXY_PORT}`;
const ADMIN = `127.0.0.1:${ADMIN_PORT}`;

const DELAY_MS = 2000;
const WINDOW_MS = 4000;
const GRACE_MS = 20000;
const CURLS = 4;
const EVENTSOURCES = 4;
const URL_PATH = '/events?interval=200ms';

const clients = []; // curl processes and EventSources, stopped at the end whatever happens

const log = logger('drain');
const procs = new Processes(WORK, log);

/** Splits an event-stream text into its blocks (without comments), in order. */
function blocks(text) {
  return text.replace(/\r\n?/g, '\n').split('\n\n')
    .map((b) => b.split('\n').filter((l) => l && !l.startsWith(':')).join('\n'))
    .filter((b) => b);
}

/**
 * Checks one stream's bytes: events, then as its very last block a `retry:` hint of the
 * drain (1000..2999 ms, after at least one event; the backend's own `retry: 1000` comes
 * first). Returns the hint in ms.
 */
function checkEndsWithHint(name, text) {
  const bs = blocks(text);
  const events = bs.filter((b) => /^id: /m.test(b));
  const last = bs[bs.length - 1] || '';
  const m = /^retry: (\d+)$/.exec(last);
  const shown = text.length > 600 ? `...${text.slice(-600)}` : text;
  assert(events.length > 0, `${name}: no event before the drain:\n${shown}`);
  assert(m, `${name}: the stream did not end with a retry: hint; last block ${JSON.stringify(last)}:\n${shown}`);
  assert(bs.indexOf(events[events.length - 1]) < bs.length - 1, `${name}: hint not after the last event`);
  const ms = Number(m[1]);
  assert(ms >= 1000 && ms < 3000, `${name}: retry hint ${ms} ms outside the drain's 1000..2999`);
  return ms;
}

/** `curl -N` on the proxy; resolves its output and when it ended. */
function curlStream(name) {
  const rec = { name, kind: 'curl', text: '', endedAt: null, code: null };
  const child = spawn('curl', ['-sN', '--max-time', '30', `http://${PROXY}${URL_PATH}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.on('data', (d) => { rec.text += d.toString(); });
  rec.done = new Promise((resolve) => {
    child.on('exit', (code) => {
      rec.endedAt = Date.now();
      rec.code = code;
      resolve(rec);
    });
  });
  rec.stop = () => { if (rec.code === null) child.kill('SIGKILL'); };
  clients.push(rec);
  return rec;
}

/**
 * An EventSource (npm) whose fetch records each connection's raw bytes and when it ended,
 * and when every connection attempt started (to see the reconnect delay).
 */
function eventSource(name) {
  const rec = { name, kind: 'eventsource', conns: [], attempts: [], events: 0 };
  const recordingFetch = async (url, init) => {
    rec.attempts.push(Date.now());
    const res = await fetch(url, init);
    if (!res.body) return res;
    const conn = { text: '', endedAt: null };
    rec.conns.push(conn);
    const [mine, theirs] = res.body.tee();
    (async () => {
      const reader = mine.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        conn.text += dec.decode(value, { stream: true });
      }
    })().catch(() => {}).finally(() => { conn.endedAt = Date.now(); });
    return new Response(theirs, { status: res.status, statusText: res.statusText, headers: res.headers });
  };
  rec.es = new EventSource(`http://${PROXY}${URL_PATH}`, { fetch: recordingFetch });
  rec.es.addEventListener('tick', () => { rec.events += 1; });
  rec.stop = () => rec.es.close();
  clients.push(rec);
  return rec;
}

async function main() {
  assertBuilt();
  rmSync(WORK, { recursive: true, force: true });
  const config = path.join(WORK, 'config');
  mkdirSync(config, { recursive: true });
  writeFileSync(path.join(config, 'route.yaml'), `apiVersion: ssegate.io/v1alpha1
kind: SseRoute
metadata: {name: events, namespace: drain}
spec:
  rules:
    - match: {path: /events}
      backend: {service: backend, port: 80}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: drain}
spec:
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: backend-1
  namespace: drain
  labels: {kubernetes.io/service-name: backend}
addressType: IPv4
ports: [{port: ${BACKEND_PORT}}]
endpoints:
  - addresses: ["127.0.0.1"]
`);

  const backend = procs.start('sse-backend', BACKEND_BIN, ['--listen', BACKEND]);
  await waitFor200(`http://${BACKEND}/healthz`, backend, 10000);
  const gate = procs.start('ssegate', SSEGATE_BIN, ['run', '--config', config, '--listen', PROXY, '--admin', ADMIN,
    '--listen-tls', 'off', '--drain-delay', `${DELAY_MS}ms`, '--drain-window', `${WINDOW_MS}ms`,
    '--grace-period', `${GRACE_MS}ms`]);
  await waitFor200(`http://${ADMIN}/readyz`, gate, 30000);
  log(`ssegate ready: proxy ${PROXY}, admin ${ADMIN}`);

  const streams = [];
  for (let i = 0; i < CURLS; i++) streams.push(curlStream(`curl-${i}`));
  for (let i = 0; i < EVENTSOURCES; i++) streams.push(eventSource(`eventsource-${i}`));
  // Every stream has had events before the signal.
  const openBy = Date.now() + 10000;
  const hasEvents = (s) => (s.kind === 'curl' ? /^id: /m.test(s.text) : s.events > 0);
  while (!streams.every(hasEvents)) {
    assert(Date.now() < openBy, `streams without events: ${streams.filter((s) => !hasEvents(s)).map((s) => s.name)}`);
    await sleep(50);
  }
  log(`${streams.length} streams open (${CURLS} curl -N, ${EVENTSOURCES} eventsource), sending SIGTERM`);

  const t0 = Date.now();
  gate.child.kill('SIGTERM');
  let ready = await status(`http://${ADMIN}/readyz`);
  for (let i = 0; i < 10 && ready === 200; i++) {
    await sleep(20);
    ready = await status(`http://${ADMIN}/readyz`);
  }
  const readyAfter = Date.now() - t0;
  assert(ready === 503, `/readyz answered ${ready} after SIGTERM, expected 503`);
  assert(readyAfter < DELAY_MS / 2, `/readyz failed only ${readyAfter} ms after SIGTERM`);
  log(`ok   - /readyz answers 503 ${readyAfter} ms after SIGTERM`);

  // Within the delay, a new stream is still accepted and served.
  const late = curlStream('curl-late (opened during the delay)');
  while (!/^id: /m.test(late.text)) {
    assert(late.code === null, `the stream opened during the drain delay ended at once (exit ${late.code}): ${late.text}`);
    assert(Date.now() - t0 < DELAY_MS, `no event on a stream opened during the drain delay: ${JSON.stringify(late.text)}`);
    await sleep(20);
  }
  log(`ok   - a stream opened ${Date.now() - t0} ms after SIGTERM (in the ${DELAY_MS} ms delay) gets events`);
  streams.push(late);

  const exit = await Promise.race([gate.exit, sleep(GRACE_MS + 5000).then(() => null)]);
  assert(exit, `ssegate did not exit within the grace period (${GRACE_MS} ms)`);
  const exitAfter = gate.exitedAt - t0;
  assert(exit.code === 0, `ssegate exited ${JSON.stringify(exit)}, expected status 0:\n${tail(gate.logFile)}`);
  assert(exitAfter < GRACE_MS, `ssegate exited ${exitAfter} ms after SIGTERM, not before the grace period`);
  log(`ok   - ssegate exited with status 0, ${exitAfter} ms after SIGTERM (delay ${DELAY_MS} + window ${WINDOW_MS}, grace ${GRACE_MS})`);

  // Give the clients a moment to see the ends and (EventSource) to try to reconnect.
  await sleep(3500);
  const ends = [];
  for (const s of streams) {
    if (s.kind === 'curl') {
      await Promise.race([s.done, sleep(2000)]);
      assert(s.code === 0, `${s.name}: curl exit ${s.code} (0 = the response ended cleanly)`);
      const hint = checkEndsWithHint(s.name, s.text);
      ends.push({ name: s.name, at: s.endedAt - t0, hint });
    } else {
      s.es.close();
      const first = s.conns[0];
      assert(first && first.endedAt, `${s.name}: its connection did not end`);
      const hint = checkEndsWithHint(s.name, first.text);
      // The client honoured the hint: its next attempt came no sooner than `retry` ms.
      const next = s.attempts[1];
      assert(next !== undefined, `${s.name}: no reconnect attempt within ${hint + 1000} ms of the end`);
      const waited = next - first.endedAt;
      assert(waited >= hint - 50, `${s.name}: reconnected after ${waited} ms, before its retry hint of ${hint} ms`);
      ends.push({ name: s.name, at: first.endedAt - t0, hint, waited });
    }
  }
  ends.sort((a, b) => a.at - b.at);
  for (const e of ends) {
    log(`  ${e.name}: ended ${e.at} ms after SIGTERM, retry: ${e.hint}${e.waited !== undefined ? `, reconnect attempt after ${e.waited} ms` : ''}`);
  }
  const first = ends[0].at;
  const last = ends[ends.length - 1].at;
  assert(first >= DELAY_MS - 100, `a stream ended ${first} ms after SIGTERM, before the ${DELAY_MS} ms delay`);
  assert(last <= exitAfter, `a stream ended after the process exited`);
  // Spread: the ends cover a good part of the window, and no quarter of the window holds
  // more than half of them (all at once would put every end in one instant).
  assert(last - first >= WINDOW_MS * 0.4,
    `ends span only ${last - first} ms of the ${WINDOW_MS} ms window: ${ends.map((e) => e.at)}`);
  for (const e of ends) {
    const near = ends.filter((o) => o.at >= e.at && o.at < e.at + WINDOW_MS / 4).length;
    assert(near <= Math.ceil(ends.length / 2),
      `${near} of ${ends.length} streams ended within ${WINDOW_MS / 4} ms: ${ends.map((x) => x.at)}`);
  }
  log(`ok   - all ${ends.length} streams got a retry: hint after their last event and then ended, ` +
    `between ${first} and ${last} ms after SIGTERM (window ${DELAY_MS}..${DELAY_MS + WINDOW_MS} ms)`);
  log(`ok   - the eventsource clients waited their retry: hint before reconnecting`);
}

const ok = await runSuite({
  log,
  procs,
  main: async () => { await main(); return true; },
  timeoutMs: 90000,
  cleanup: async () => { for (const c of clients) c.stop(); },
  termMs: 0,
});
console.log(`drain: ${ok ? '1 passed, 0 failed' : '0 passed, 1 failed'}`);
process.exit(ok ? 0 : 1);
