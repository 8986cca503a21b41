// What the node e2e suites (standalone/, tls/, drain/) share: where the release binaries are,
// free loopback ports, a launcher for the processes under test (logs in e2e/.work/<suite>/,
// stopped on every exit path), readiness polling and headless Chromium (playwright-core).

import { spawn } from 'node:child_process';
import { copyFileSync, createWriteStream, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root. */
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** Where cargo put the builds (CARGO_TARGET_DIR, default <repo>/target). */
export const TARGET = process.env.CARGO_TARGET_DIR
  ? path.resolve(REPO, process.env.CARGO_TARGET_DIR)
  : path.join(REPO, 'target');
/** The release ssegate. */
export const SSEGATE_BIN = path.join(TARGET, 'release', 'ssegate');
/** The release example SSE backend. */
export const BACKEND_BIN = path.join(TARGET, 'release', 'examples', 'sse-backend');
/** The browser playwright-core drives. */
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
/** The port the example manifests (manifests/examples/backend.yaml) expect the backend on. */
export const EXAMPLE_BACKEND_PORT = 9090;

/** A failed check: reported by its message alone, without a stack. */
export class CheckError extends Error {}
/** A check that does not apply to this run. */
export class Skip extends Error {}

/** Throws a [`CheckError`] with `msg` unless `cond`. */
export function assert(cond, msg) {
  if (!cond) throw new CheckError(msg);
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A logger that prefixes every line with `[suite]`. */
export function logger(suite) {
  return (msg) => console.log(`[${suite}] ${msg}`);
}

/** The last `lines` lines of a log file. */
export function tail(file, lines = 30) {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

/**
 * `n` distinct free TCP ports on 127.0.0.1, as the OS hands them out for port 0 (all held
 * open until every one is known, so they differ). Another process could take one before
 * the suite binds it; that is an ordinary start-up failure, not a silent collision.
 */
export async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i += 1) {
      const server = net.createServer();
      servers.push(server);
      await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(0, '127.0.0.1', resolve);
      });
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(() => resolve()))));
  }
}

/**
 * Writes the example backend's Service and EndpointSlice (manifests/examples/backend.yaml)
 * to `file` with the backend on `port` instead of the example's 9090.
 */
export function writeExampleBackendYaml(file, port) {
  const text = readFileSync(path.join(REPO, 'manifests', 'examples', 'backend.yaml'), 'utf8');
  const moved = text.replace(/^([ \t-]*(?:target)?[pP]ort:[ \t]*)9090[ \t]*$/gm, `$1${port}`);
  assert(port === EXAMPLE_BACKEND_PORT || moved !== text, 'manifests/examples/backend.yaml no longer names port 9090');
  writeFileSync(file, moved);
}

/**
 * Copies the YAML files of config directory `from` into `to`, with the example backend
 * (manifests/examples/backend.yaml) moved to `port`.
 */
export function copyExampleConfig(from, to, port) {
  mkdirSync(to, { recursive: true });
  for (const name of readdirSync(from)) {
    if (!/\.ya?ml$/.test(name)) continue;
    if (name === 'backend.yaml') writeExampleBackendYaml(path.join(to, name), port);
    else copyFileSync(path.join(from, name), path.join(to, name));
  }
}

/** Fails with the build command unless the release binaries are there. */
export function assertBuilt(bins = [BACKEND_BIN, SSEGATE_BIN]) {
  for (const bin of bins) {
    assert(existsSync(bin), `${bin} not built; run: cargo build --release --bin ssegate --example sse-backend`);
  }
}

/**
 * The processes of one suite. Each runs with its stdout and stderr in `<logDir>/<name>.log`;
 * whatever is still running when node exits is killed.
 */
export class Processes {
  constructor(logDir, log) {
    this.logDir = logDir;
    this.log = log;
    this.children = [];
    process.on('exit', () => {
      for (const c of this.children) if (c.exited === null) c.child.kill('SIGKILL');
    });
  }

  /**
   * Starts `bin args`. The entry has `exited` ({code, signal} or null), `exitedAt` (ms),
   * `exit` (a promise of `exited`) and `logFile`.
   */
  start(name, bin, args) {
    mkdirSync(this.logDir, { recursive: true });
    const logFile = path.join(this.logDir, `${name}.log`);
    const out = createWriteStream(logFile);
    const child = spawn(bin, args, { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.pipe(out);
    child.stderr.pipe(out);
    const entry = { name, child, logFile, exited: null, exitedAt: null };
    entry.exit = new Promise((resolve) => {
      const done = (exited) => {
        if (entry.exited === null) {
          entry.exited = exited;
          entry.exitedAt = Date.now();
        }
        resolve(entry.exited);
      };
      child.on('exit', (code, signal) => done({ code, signal }));
      child.on('error', (err) => done({ code: null, signal: null, err }));
    });
    this.children.push(entry);
    this.log(`started ${name} (pid ${child.pid}): ${path.relative(REPO, bin)} ${args.join(' ')}`);
    return entry;
  }

  /** Stops every child still running: SIGTERM, then SIGKILL after `termMs` (0: SIGKILL at once). */
  async stopAll(termMs = 2000) {
    const alive = this.children.filter((c) => c.exited === null);
    for (const c of alive) c.child.kill(termMs > 0 ? 'SIGTERM' : 'SIGKILL');
    await Promise.race([Promise.all(alive.map((c) => c.exit)), sleep(termMs)]);
    for (const c of alive) if (c.exited === null) c.child.kill('SIGKILL');
    await Promise.race([Promise.all(alive.map((c) => c.exit)), sleep(2000)]);
  }

  /** Logs the last lines of every child's log. */
  logTails() {
    for (const c of this.children) this.log(`--- last lines of ${path.relative(REPO, c.logFile)}:\n${tail(c.logFile)}`);
  }
}

/** The HTTP status of a GET of `url`, or the connection error's code. */
export async function status(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer();
    return res.status;
  } catch (err) {
    return err.cause?.code || err.message;
  }
}

/** Polls `url` until it answers 200; fails early, with its log, if `entry` exits. */
export async function waitFor200(url, entry, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last = 'no answer';
  while (Date.now() < deadline) {
    if (entry.exited) {
      throw new CheckError(
        `${entry.name} exited (${JSON.stringify(entry.exited)}) before ${url} answered 200; ` +
        `log ${path.relative(REPO, entry.logFile)}:\n${tail(entry.logFile)}`,
      );
    }
    last = await status(url);
    if (last === 200) return;
    await sleep(100);
  }
  throw new CheckError(`${url} not 200 within ${timeoutMs} ms (last: ${last})`);
}

/** Headless Chromium (playwright-core) on [`CHROMIUM`], with `extraArgs` added to the usual flags. */
export async function launchChromium(extraArgs = []) {
  assert(existsSync(CHROMIUM), `no browser at ${CHROMIUM} (apt-get install -y chromium)`);
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
      '--no-first-run', '--disable-component-update', '--disable-sync', ...extraArgs],
  });
}

/**
 * Runs a suite's `main` (resolving true when every check passed) and stops `procs` whatever
 * happens: on a thrown error (logged with the processes' logs), on SIGINT/SIGTERM and after
 * `timeoutMs` (both exit at once). `cleanup` runs before the processes are stopped (browsers,
 * clients); `termMs` is [`Processes.stopAll`]'s. Resolves whether the suite passed.
 */
export async function runSuite({ log, procs, main, timeoutMs, cleanup = async () => {}, termMs = 2000 }) {
  const overall = setTimeout(async () => {
    log(`FAIL - overall timeout of ${timeoutMs / 1000} s reached`);
    procs.logTails();
    await procs.stopAll(termMs);
    process.exit(1);
  }, timeoutMs);
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, async () => {
      log(`got ${sig}, stopping`);
      await procs.stopAll(termMs);
      process.exit(130);
    });
  }
  let ok = false;
  try {
    ok = await main();
  } catch (err) {
    log(`FAIL - ${err instanceof CheckError ? err.message : err.stack}`);
    procs.logTails();
  } finally {
    await cleanup();
    await procs.stopAll(termMs);
    clearTimeout(overall);
  }
  return ok;
}
