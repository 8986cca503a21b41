#!/usr/bin/env node
// End-to-end check of TLS and HTTP/2 with real clients, without Kubernetes.
//
// Makes a throw-away CA and a certificate for `localhost` with the openssl CLI, writes a
// standalone config (the example backend's Service, a Secret that points at the PEM files with
// the ssegate.io/tls-cert-file / tls-key-file annotations, and a route with spec.tls), starts
// the release example backend and ssegate, then checks:
//   - curl --http2 over TLS (verifying against the CA) gets HTTP/2 and the events;
//   - curl --http2-prior-knowledge on the plain listener gets HTTP/2 (h2c) and the events;
//   - headless Chromium opens 10 EventSource streams to one https origin: the page was loaded
//     over h2 and all 10 streams receive events at the same time (over HTTP/1.1 a browser
//     holds at most 6 connections per origin, so streams 7..10 would get nothing).
//
//   cargo build --release --bin ssegate --example sse-backend
//   npm ci --prefix e2e
//   node e2e/tls/run.mjs            # or: scripts/test
//
// Every listener (backend, proxy, TLS, admin) is on a free loopback port the OS picks at run
// time. Environment (all optional): CHROMIUM (/usr/bin/chromium), CARGO_TARGET_DIR.

import { execFile, execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  BACKEND_BIN, CheckError, Processes, REPO, SSEGATE_BIN, assert, assertBuilt, freePorts, launchChromium, logger,
  runSuite, sleep, waitFor200, writeExampleBackendYaml,
} from '../lib.mjs';

const WORK = path.join(REPO, 'e2e', '.work', 'tls');
const CONFIG = path.join(WORK, 'config');
const [BACKEND_PORT, LISTEN_PORT, HTTPS_PORT, ADMIN_PORT] = await freePorts(4);
const LISTEN = `127.0.0.1:${LISTEN_PORT}`;
const HTTPS = `127.0.0.1:${HTTPS_PORT}`;
const ADMIN = `127.0.0.1:${ADMIN_PORT}`;
const BACKEND = `127.0.0.1:${BACKEND_PORT}`;
const ORIGIN = `https://localhost:${HTTPS_PORT}`;
const STREAMS = 10;

const log = logger('tls');
const procs = new Processes(WORK, log);
let browser = null;

function curl(args) {
  return new Promise((resolve) => {
    execFile('curl', ['-sS', '-N', '--max-time', '10', '-w', '\n%{http_version}', ...args],
      { timeout: 15000 }, (err, stdout, stderr) => resolve({ code: err ? (err.code ?? err.signal) : 0, stdout, stderr }));
  });
}

function ids(text) {
  return [...text.matchAll(/^id: ?(\S+)$/gm)].map((m) => m[1]);
}

// ---------------------------------------------------------------- setup

function makeConfig() {
  rmSync(WORK, { recursive: true, force: true });
  mkdirSync(CONFIG, { recursive: true });
  const openssl = (args) => execFileSync('openssl', args, { cwd: WORK, stdio: ['ignore', 'ignore', 'pipe'] });
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=ssegate e2e CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']);
  openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', path.join(CONFIG, 'localhost.key'), '-out', 'localhost.csr', '-subj', '/CN=localhost']);
  writeFileSync(path.join(WORK, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  openssl(['x509', '-req', '-in', 'localhost.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial',
    '-days', '2', '-extfile', 'ext.cnf', '-out', path.join(CONFIG, 'localhost.crt')]);
  writeExampleBackendYaml(path.join(CONFIG, 'backend.yaml'), BACKEND_PORT);
  writeFileSync(path.join(CONFIG, 'tls.yaml'), `# Standalone mode: the Secret's PEM comes from files next to this manifest.
apiVersion: v1
kind: Secret
metadata:
  name: localhost-tls
  namespace: demo
  annotations:
    ssegate.io/tls-cert-file: localhost.crt
    ssegate.io/tls-key-file: localhost.key
type: kubernetes.io/tls
---
apiVersion: ssegate.io/v1alpha1
kind: SseRoute
metadata:
  name: events-tls
  namespace: demo
spec:
  hostnames: [localhost]
  tls: {secretName: localhost-tls}
  rules:
    - match: {path: /events}
      backend: {service: example-backend, port: 80}
`);
}

// ---------------------------------------------------------------- checks

const checks = [];
const check = (name, fn) => checks.push({ name, fn });

check('curl --http2 over TLS (verified against the CA): HTTP/2, ids 1..3', async () => {
  const r = await curl(['--http2', '--cacert', path.join(WORK, 'ca.crt'),
    `${ORIGIN}/events?interval=50ms&count=3`]);
  const [body, version] = [r.stdout.slice(0, r.stdout.lastIndexOf('\n')), r.stdout.slice(r.stdout.lastIndexOf('\n') + 1)];
  assert(r.code === 0, `curl exited ${r.code}: ${r.stderr}`);
  assert(version === '2', `expected HTTP/2, curl reports ${version}`);
  assert(ids(body).join(',') === '1,2,3', `expected ids 1,2,3 in:\n${body}`);
});

check('curl --http2-prior-knowledge (h2c) on the plain listener: HTTP/2, ids 1..3', async () => {
  const r = await curl(['--http2-prior-knowledge', '-H', 'Host: localhost',
    `http://${LISTEN}/events?interval=50ms&count=3`]);
  const [body, version] = [r.stdout.slice(0, r.stdout.lastIndexOf('\n')), r.stdout.slice(r.stdout.lastIndexOf('\n') + 1)];
  assert(r.code === 0, `curl exited ${r.code}: ${r.stderr}`);
  assert(version === '2', `expected HTTP/2, curl reports ${version}`);
  assert(ids(body).join(',') === '1,2,3', `expected ids 1,2,3 in:\n${body}`);
});

/** In the page: opens `n` EventSources and resolves once each has `want` events (or on timeout). */
function openMany({ n, want, timeoutMs }) {
  return new Promise((resolve) => {
    const counts = new Array(n).fill(0);
    const sources = [];
    const done = (timedOut) => {
      clearTimeout(timer);
      for (const es of sources) es.close();
      const nav = performance.getEntriesByType('navigation')[0];
      resolve({ counts, timedOut, protocol: nav ? nav.nextHopProtocol : 'unknown' });
    };
    const timer = setTimeout(() => done(true), timeoutMs);
    for (let i = 0; i < n; i += 1) {
      const es = new EventSource(`/events?interval=100ms&stream=${i}`);
      es.addEventListener('tick', () => {
        counts[i] += 1;
        if (counts.every((c) => c >= want)) done(false);
      });
      sources.push(es);
    }
  });
}

check(`Chromium: ${STREAMS} EventSource streams to one origin over h2 all receive at once`, async () => {
  // The certificate is from a throw-away CA the browser does not know.
  browser = await launchChromium(['--ignore-certificate-errors']);
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  await page.goto(`${ORIGIN}/e2e-page-does-not-exist`, { timeout: 10000 });
  const result = await page.evaluate(openMany, { n: STREAMS, want: 3, timeoutMs: 15000 });
  log(`  protocol=${result.protocol} events per stream=[${result.counts}]${result.timedOut ? ' TIMED OUT' : ''}`);
  assert(result.protocol === 'h2', `page loaded over ${result.protocol}, expected h2`);
  assert(!result.timedOut, `not every stream got 3 events while all ${STREAMS} were open: [${result.counts}]`);
  await context.close();
});

// ---------------------------------------------------------------- main

async function main() {
  assertBuilt();
  makeConfig();
  const backend = procs.start('sse-backend', BACKEND_BIN, ['--listen', BACKEND]);
  await waitFor200(`http://${BACKEND}/healthz`, backend, 10000);
  const gate = procs.start('ssegate', SSEGATE_BIN, ['run', '--config', CONFIG, '--listen', LISTEN,
    '--listen-tls', HTTPS, '--admin', ADMIN, '--https-port', String(HTTPS_PORT)]);
  await waitFor200(`http://${ADMIN}/readyz`, gate, 30000);
  log(`ssegate ready: ${ORIGIN} (TLS), http://${LISTEN} (plain)`);

  let failed = 0;
  for (const { name, fn } of checks) {
    const started = Date.now();
    try {
      await Promise.race([fn(), sleep(40000).then(() => { throw new CheckError('timed out after 40 s'); })]);
      log(`ok   - ${name} (${Date.now() - started} ms)`);
    } catch (err) {
      failed += 1;
      log(`FAIL - ${name}\n${err instanceof CheckError ? err.message : err.stack}`);
    }
  }
  if (failed) procs.logTails();
  console.log(`tls: ${checks.length - failed} passed, ${failed} failed`);
  return failed === 0;
}

const ok = await runSuite({
  log,
  procs,
  main,
  timeoutMs: 120000,
  cleanup: async () => { if (browser) await browser.close().catch(() => {}); },
});
process.exit(ok ? 0 : 1);
