#!/usr/bin/env python3
"""
End-to-end test of ssegate in cluster mode: the REAL kubectl and the release ssegate binary
against an API server, the controller issue's scenarios 1-6, and TLS from Secrets (scenario 7:
SNI and h2 on the TLS listener, certificate rotation under an open stream, a bad certificate
keeping the last good one, upstream TLS verified with a CA from an Opaque Secret), and
`--default-cert` files reloaded on edit (scenario 8).
Certificates are made at test time with the openssl CLI.

    cargo build --release --bin ssegate --example sse-backend
    .venv/bin/python e2e/controller/run.py           # or: scripts/test

By default it starts the API server emulator (e2e/apiserver) and points both kubectl and
two ssegate replicas at it through kubeconfigs. With E2E_KUBECONFIG=/path/to/kubeconfig it
runs unchanged against that cluster instead (see e2e/README.md): everything goes into a fresh
namespace that is deleted at the end, ssegate watches only that namespace and serves its own
class, and the CRD from crds/ is applied (so the cluster's schema validation is exercised too).

Environment (all optional):
  E2E_KUBECONFIG    use this cluster instead of the emulator
  E2E_BACKEND_IP    address the example backend listens on and the EndpointSlice points at
                    (default 127.0.0.1; ssegate runs on this machine, so loopback works)
  CARGO_TARGET_DIR  where the release binaries are (default <repo>/target)

Prints one line per check and ends with "N passed, M failed"; exit status 1 on a failure.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
TARGET = pathlib.Path(os.environ.get('CARGO_TARGET_DIR') or REPO / 'target')
if not TARGET.is_absolute():
    TARGET = REPO / TARGET
SSEGATE = TARGET / 'release' / 'ssegate'
BACKEND = TARGET / 'release' / 'examples' / 'sse-backend'
WORK = REPO / 'e2e' / '.work' / 'controller'

REAL = bool(os.environ.get('E2E_KUBECONFIG'))
BACKEND_IP = os.environ.get('E2E_BACKEND_IP', '127.0.0.1')
SUFFIX = secrets.token_hex(3)
NS = f'ssegate-e2e-{SUFFIX}' if REAL else 'ssegate-e2e'
# Against a real cluster, a class of our own keeps any installed ssegate away from our routes
# (and us away from its routes).
CLASS = f'e2e-{SUFFIX}' if REAL else 'ssegate'
LEASE = 'ssegate-e2e-leader'
LEASE_DURATION = 4.0
RETRY_PERIOD = 0.5
SSEGATE_TOKEN = 'ssegate-e2e'

PASSED = 0
FAILED = 0
CHILDREN: list[subprocess.Popen] = []


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f'[controller] {msg}', flush=True)


def ok(name: str) -> None:
    global PASSED
    PASSED += 1
    print(f'ok - {name}', flush=True)


def check(cond: bool, name: str, detail: str = '') -> None:
    if not cond:
        raise CheckFailed(f'{name}{": " + detail if detail else ""}')
    ok(name)


def wait_for(fn, what: str, timeout: float = 10.0, interval: float = 0.1):
    """Polls fn until it returns something truthy; fails with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling, report at the end
            last = f'{type(e).__name__}: {e}'
        time.sleep(interval)
    raise CheckFailed(f'{what}: not within {timeout:g}s (last: {last!r})')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    out = open(WORK / f'{name}.log', 'w')
    p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                         start_new_session=True)
    CHILDREN.append(p)
    return p


# ------------------------------------------------------------------------------ kubectl

KUBECONFIG = ''  # of kubectl (the admin)
SSEGATE_KUBECONFIG = ''  # of ssegate (in the emulator: its own token, for the audit log)


def kubectl(*args: str, stdin: str | None = None, check_rc: bool = True) -> str:
    env = dict(os.environ, KUBECONFIG=KUBECONFIG, KUBECACHEDIR=str(WORK / 'kubecache'))
    cmd = ['kubectl', *args]
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=60)
    if check_rc and r.returncode != 0:
        raise CheckFailed(f'{" ".join(cmd)} failed: {r.stderr.strip()}')
    return r.stdout if check_rc else r.stdout + r.stderr


def apply(manifest: str) -> str:
    extra = [] if REAL else ['--validate=false']  # the emulator serves no OpenAPI
    return kubectl('apply', *extra, '-f', '-', stdin=manifest)


def route_yaml(name: str, path: str, service: str = 'ticker', class_name: str | None = CLASS) -> str:
    cls = f'\n  className: {class_name}' if class_name else ''
    return f'''apiVersion: ssegate.io/v1alpha1
kind: SseRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:{cls}
  rules:
  - match: {{path: {path}}}
    backend: {{service: {service}, port: 80, rewritePath: /events}}
'''


def service_yaml() -> str:
    return f'''apiVersion: v1
kind: Service
metadata: {{name: ticker, namespace: {NS}}}
spec:
  ports: [{{name: http, port: 80, targetPort: 9090}}]
'''


def slice_yaml(port: int, ready: bool) -> str:
    return f'''apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ticker-local
  namespace: {NS}
  labels: {{kubernetes.io/service-name: ticker, endpointslice.kubernetes.io/managed-by: ssegate-e2e}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
- addresses: ["{BACKEND_IP}"]
  conditions: {{ready: {str(ready).lower()}}}
'''


def route_obj(name: str) -> dict:
    return json.loads(kubectl('get', 'sseroute', name, '-n', NS, '-o', 'json'))


def condition(obj: dict, type_: str) -> dict:
    for c in (obj.get('status') or {}).get('conditions') or []:
        if c.get('type') == type_:
            return c
    return {}


# ------------------------------------------------------------------------------ ssegate

class Replica:
    def __init__(self, name: str, extra_args: tuple[str, ...] = ()):
        self.name = name
        self.port = free_port()
        self.admin = free_port()
        # Two replicas on one machine: each needs its own TLS port (the default
        # 0.0.0.0:8443 would collide).
        self.tls_port = free_port()
        args = [str(SSEGATE), 'run', '--listen', f'127.0.0.1:{self.port}',
                '--admin', f'127.0.0.1:{self.admin}', '--class', CLASS,
                '--listen-tls', f'127.0.0.1:{self.tls_port}',
                '--lease-name', LEASE, '--lease-namespace', NS,
                '--lease-duration', f'{LEASE_DURATION:g}s', '--lease-renew-deadline', '3s',
                '--lease-retry-period', f'{int(RETRY_PERIOD * 1000)}ms', '--identity', name]
        if REAL:
            args += ['--namespace', NS]  # never touch the rest of a real cluster
        args += extra_args
        env = dict(os.environ, KUBECONFIG=SSEGATE_KUBECONFIG, RUST_LOG='info,ssegate=debug')
        self.proc = spawn(name, args, env)

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.port}{path}'

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f'http://127.0.0.1:{self.admin}/metrics', timeout=2) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith('#') and '{' not in line:
                k, v = line.rsplit(' ', 1)
                out[k] = float(v)
        return out

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{self.admin}/readyz', timeout=1) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001 - 503 or not listening yet
            return False

    def leader(self) -> bool:
        return self.metrics().get('ssegate_leader') == 1

    def writes(self) -> float:
        return self.metrics().get('ssegate_status_writes_total', 0)


def http_code(url: str) -> str:
    """Status code of a GET (a stream is cut after 1 s; its 200 still counts)."""
    r = subprocess.run(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', '-m', '1', url],
                       capture_output=True, text=True)
    return r.stdout


def curl_events(url: str, seconds: float = 5) -> list[str]:
    r = subprocess.run(['curl', '-sN', '-m', str(seconds), url], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if line.startswith('id:')]


def stream_in_background(name: str, url: str):
    path = WORK / f'{name}.stream'
    out = open(path, 'w')
    p = subprocess.Popen(['curl', '-sN', url], stdout=out, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    CHILDREN.append(p)
    return p, path


def count_events(path: pathlib.Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.startswith('id:'))


# ------------------------------------------------------------------------------ scenarios

def setup() -> tuple[int, list[Replica]]:
    global KUBECONFIG, SSEGATE_KUBECONFIG
    for binary in (SSEGATE, BACKEND):
        if not binary.exists():
            raise CheckFailed(f'{binary} missing: cargo build --release --bin ssegate --example sse-backend')
    if REAL:
        KUBECONFIG = SSEGATE_KUBECONFIG = os.environ['E2E_KUBECONFIG']
        log(f'against the cluster of {KUBECONFIG}, namespace {NS}, class {CLASS}')
    else:
        ready = WORK / 'apiserver.ready'
        spawn('apiserver', [sys.executable, str(REPO / 'e2e/apiserver/server.py'), '--port', '0',
                            '--kubeconfig-out', str(WORK / 'kubeconfig'), '--ready-file', str(ready),
                            '--audit-log', str(WORK / 'audit.jsonl'), '--bookmark-interval', '2'])
        wait_for(lambda: ready.exists() and ready.read_text().strip(), 'the API server emulator starts')
        KUBECONFIG = str(WORK / 'kubeconfig')
        cfg = yaml.safe_load(pathlib.Path(KUBECONFIG).read_text())
        cfg['users'][0]['user']['token'] = SSEGATE_TOKEN
        SSEGATE_KUBECONFIG = str(WORK / 'kubeconfig-ssegate')
        pathlib.Path(SSEGATE_KUBECONFIG).write_text(yaml.safe_dump(cfg))
        log(f'emulator at {ready.read_text().strip()}')

    apply(f'apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n')
    backend_port = free_port()
    spawn('sse-backend', [str(BACKEND), '--listen', f'{BACKEND_IP}:{backend_port}'])
    wait_for(lambda: http_code(f'http://{BACKEND_IP}:{backend_port}/healthz') == '200', 'the example backend starts')

    replicas = []
    if not REAL:
        # Started before the CRD exists: the SseRoute watch fails (404) and backs off, and
        # /readyz stays 503 until every watch has listed.
        replicas = [Replica('ssegate-a'), Replica('ssegate-b')]
        wait_for(lambda: 'watch failed' in (WORK / 'ssegate-a.log').read_text(), 'the SseRoute watch fails without the CRD')
        time.sleep(1.0)
        check(not any(r.ready() for r in replicas), 'not ready while the SseRoute watch fails (no CRD yet)')
    kubectl('apply', *([] if REAL else ['--validate=false']), '-f', str(REPO / 'crds'))
    kubectl('wait', '--for=condition=Established', '--timeout=30s', 'crd/sseroutes.ssegate.io')
    ok('the CRD from crds/ applies and is Established')
    if not REAL:
        # A real cluster would start the Deployment; the emulator only stores it.
        out = kubectl('apply', '--validate=false', '-f', str(REPO / 'crds'), '-f', str(REPO / 'manifests/install'))
        check(all(f'{o} created' in out for o in (
                  'namespace/ssegate', 'deployment.apps/ssegate', 'clusterrole.rbac.authorization.k8s.io/ssegate',
                  'role.rbac.authorization.k8s.io/ssegate-leader-election', 'serviceaccount/ssegate')),
              'kubectl apply -f crds/ -f manifests/install/ installs ssegate', out)
    else:
        replicas = [Replica('ssegate-a'), Replica('ssegate-b')]
    for r in replicas:
        wait_for(r.ready, f'{r.name} /readyz after the initial lists', timeout=30)
    ok('both replicas are ready (every watch listed after backoff, first table published)')
    return backend_port, replicas


def scenario_1(replicas: list[Replica]) -> None:
    log('1: a route whose Service is missing')
    apply(route_yaml('feed', '/feed'))
    obj = wait_for(lambda: (o := route_obj('feed')).get('status', {}).get('observedGeneration') == 1 and o,
                   'status written for generation 1')
    acc, refs, ready = (condition(obj, t) for t in ('Accepted', 'ResolvedRefs', 'Ready'))
    check(acc.get('status') == 'True', 'Accepted=True', json.dumps(acc))
    check(refs.get('status') == 'False' and refs.get('reason') == 'BackendNotFound'
          and f'Service {NS}/ticker not found' in refs.get('message', ''),
          'ResolvedRefs=False, reason BackendNotFound names the missing Service', json.dumps(refs))
    check(ready.get('status') == 'False', 'Ready=False without endpoints', json.dumps(ready))
    check(obj['status'].get('readyEndpoints') == 0, 'readyEndpoints=0')
    table = kubectl('get', 'ssr', '-n', NS)
    check('READY' in table and 'False' in table, 'kubectl get ssr shows the Ready column', table)
    # A route of another class is not ours: no status, no routing.
    apply(route_yaml('theirs', '/theirs', class_name='someone-else'))


def scenario_2(backend_port: int, replicas: list[Replica]) -> None:
    log('2: Service and EndpointSlice pointing at the local SSE backend')
    apply(service_yaml())
    apply(slice_yaml(backend_port, ready=True))
    obj = wait_for(lambda: condition(o := route_obj('feed'), 'Ready').get('status') == 'True' and o,
                   'Ready=True')
    check(obj['status'].get('readyEndpoints') == 1, 'readyEndpoints=1')
    check(condition(obj, 'ResolvedRefs').get('status') == 'True', 'ResolvedRefs=True')
    for r in replicas:
        events = wait_for(lambda: curl_events(r.url('/feed?interval=100ms&count=3'), 3),
                          f'curl -N through {r.name}')
        check(len(events) == 3, f'curl -N through {r.name} receives the events', repr(events))
    if not REAL:
        # The emulator does not validate against the schema (a real cluster rejects this at
        # apply time): an SseRoute that does not deserialize is reported and skipped.
        apply(route_yaml('broken', '/broken').replace('port: 80', 'port: [80]'))
        obj = wait_for(lambda: condition(o := route_obj('broken'), 'Accepted').get('reason') == 'InvalidSpec' and o,
                       'the unreadable route gets a status')
        acc = condition(obj, 'Accepted')
        check(acc.get('status') == 'False' and 'spec.rules[0].backend.port' in acc.get('message', ''),
              'an SseRoute that does not deserialize: Accepted=False, InvalidSpec, names the field', json.dumps(acc))
        check(len(curl_events(replicas[0].url('/feed?interval=100ms&count=2'), 3)) == 2,
              'the other routes keep working')
        kubectl('delete', 'sseroute', 'broken', '-n', NS)
    theirs = route_obj('theirs')
    check(not theirs.get('status'), 'a route of another class gets no status', json.dumps(theirs.get('status')))
    check(http_code(replicas[0].url('/theirs')) == '404', 'a route of another class is not served')


def scenario_3(replicas: list[Replica]) -> None:
    log('3: change the path while a stream is open')
    proc, path = stream_in_background('old-stream', replicas[0].url('/feed?interval=100ms'))
    wait_for(lambda: count_events(path) >= 2, 'the stream on /feed flows')
    apply(route_yaml('feed', '/news'))
    wait_for(lambda: route_obj('feed').get('status', {}).get('observedGeneration') == 2,
             'status observedGeneration=2 after the change')
    wait_for(lambda: http_code(replicas[0].url('/news')) == '200', 'the new path serves')
    ok('the new path serves')
    check(http_code(replicas[0].url('/feed')) == '404', 'the old path 404s for new requests')
    before = count_events(path)
    time.sleep(1.0)
    after = count_events(path)
    check(proc.poll() is None and after >= before + 5,
          'the stream opened on the old path keeps flowing', f'{before} -> {after} events')
    proc.terminate()


def scenario_4(replicas: list[Replica], backend_port: int) -> None:
    log('4: the endpoint turns unready')
    apply(slice_yaml(backend_port, ready=False))
    obj = wait_for(lambda: condition(o := route_obj('feed'), 'Ready').get('status') == 'False' and o,
                   'Ready=False')
    ready = condition(obj, 'Ready')
    check(ready.get('reason') == 'NoReadyEndpoints', 'Ready=False, reason NoReadyEndpoints', json.dumps(ready))
    check(obj['status'].get('readyEndpoints') == 0, 'readyEndpoints=0')
    check(http_code(replicas[0].url('/news')) == '503', 'new requests get 503')


def scenario_5(replicas: list[Replica]) -> None:
    log('5: delete the route')
    leader = wait_for(lambda: [r for r in replicas if r.leader()], 'a leader')[0]
    kubectl('delete', 'sseroute', 'feed', '-n', NS)
    for r in replicas:
        wait_for(lambda: http_code(r.url('/news')) == '404', f'{r.name} 404s once the route is gone')
    ok('requests 404 after the delete')
    writes = leader.writes()
    errors = leader.metrics().get('ssegate_status_write_errors_total', 0)
    time.sleep(1.5)
    check(leader.writes() == writes and leader.metrics().get('ssegate_status_write_errors_total', 0) == errors,
          'the status writer stops (no writes, no failing writes)')
    gone = kubectl('get', 'sseroute', 'feed', '-n', NS, check_rc=False)
    check('NotFound' in gone or 'not found' in gone, 'the deleted route stays deleted', gone)


def scenario_6(replicas: list[Replica], backend_port: int) -> None:
    log('6: two replicas, leader failover')
    apply(route_yaml('feed', '/feed'))
    apply(slice_yaml(backend_port, ready=True))
    wait_for(lambda: condition(route_obj('feed'), 'Ready').get('status') == 'True', 'Ready=True again')
    leaders = [r for r in replicas if r.leader()]
    check(len(leaders) == 1, 'exactly one replica is the leader', str([r.name for r in leaders]))
    leader = leaders[0]
    follower = next(r for r in replicas if r is not leader)
    holder = kubectl('get', 'lease', LEASE, '-n', NS, '-o', 'jsonpath={.spec.holderIdentity}')
    check(holder == leader.name, 'the Lease names the leader', holder)
    check(leader.writes() > 0 and follower.writes() == 0, 'only the leader wrote statuses',
          f'{leader.name}={leader.writes()} {follower.name}={follower.writes()}')
    for r in replicas:
        check(len(curl_events(r.url('/feed?interval=100ms&count=2'), 3)) == 2, f'{r.name} routes traffic')

    log(f'killing the leader {leader.name}')
    leader.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    leader.proc.wait()
    wait_for(follower.leader, f'{follower.name} takes over', timeout=LEASE_DURATION + 5, interval=0.05)
    took = time.monotonic() - killed
    # The follower saw the last renewal at most one retry period before the kill, and checks
    # every retry period: the Lease expires on its clock within the lease duration of that.
    bound = LEASE_DURATION + 2 * RETRY_PERIOD + 0.5
    check(took <= bound, f'takeover within the lease duration ({took:.1f}s <= {bound:g}s)')
    holder = kubectl('get', 'lease', LEASE, '-n', NS, '-o', 'jsonpath={.spec.holderIdentity}')
    check(holder == follower.name, 'the Lease names the new leader', holder)
    apply(slice_yaml(backend_port, ready=False))
    wait_for(lambda: condition(route_obj('feed'), 'Ready').get('status') == 'False',
             'the new leader writes statuses')
    check(follower.writes() > 0, 'the new leader writes statuses')
    check(http_code(follower.url('/feed')) == '503', 'the survivor routes (503 without endpoints)')


# ------------------------------------------------------------------------------ TLS (scenario 7)

CERTS = WORK / 'certs'


def openssl(*args: str) -> None:
    r = subprocess.run(['openssl', *args], cwd=CERTS, capture_output=True, text=True)
    if r.returncode != 0:
        raise CheckFailed(f'openssl {" ".join(args)} failed: {r.stderr.strip()}')


def make_ca(name: str) -> None:
    """A throw-away CA: CERTS/<name>.crt and .key."""
    CERTS.mkdir(parents=True, exist_ok=True)
    openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
            '-keyout', f'{name}.key', '-out', f'{name}.crt', '-days', '2', '-subj', f'/CN=ssegate e2e {name}',
            '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign')


def make_leaf(ca: str, name: str, dns: list[str]) -> tuple[str, str]:
    """A certificate for the DNS names, signed by CA `ca`: (cert PEM, key PEM)."""
    openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
            '-keyout', f'{name}.key', '-out', f'{name}.csr', '-subj', f'/CN={dns[0]}')
    (CERTS / f'{name}.ext').write_text(
        'subjectAltName=' + ','.join(f'DNS:{d}' for d in dns) + '\nextendedKeyUsage=serverAuth\n')
    openssl('x509', '-req', '-in', f'{name}.csr', '-CA', f'{ca}.crt', '-CAkey', f'{ca}.key',
            '-CAcreateserial', '-days', '2', '-extfile', f'{name}.ext', '-out', f'{name}.crt')
    return (CERTS / f'{name}.crt').read_text(), (CERTS / f'{name}.key').read_text()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_yaml(name: str, type_: str, data: dict[str, str]) -> str:
    lines = ''.join(f'  {k}: {b64(v)}\n' for k, v in data.items())
    return f'''apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: {NS}}}
type: {type_}
data:
{lines}'''


def backend_objects(service: str, port: int, target: int) -> str:
    """A Service and an EndpointSlice pointing at a local backend on `target`."""
    return f'''apiVersion: v1
kind: Service
metadata: {{name: {service}, namespace: {NS}}}
spec:
  ports: [{{name: p, port: {port}, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-local
  namespace: {NS}
  labels: {{kubernetes.io/service-name: {service}, endpointslice.kubernetes.io/managed-by: ssegate-e2e}}
addressType: IPv4
ports: [{{name: p, port: {target}, protocol: TCP}}]
endpoints:
- addresses: ["{BACKEND_IP}"]
  conditions: {{ready: true}}
'''


def tls_route_yaml(name: str, hosts: list[str], secret: str) -> str:
    return f'''apiVersion: ssegate.io/v1alpha1
kind: SseRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  className: {CLASS}
  hostnames: [{", ".join(hosts)}]
  tls: {{secretName: {secret}}}
  rules:
  - match: {{path: /secure}}
    backend: {{service: secure, port: 80, rewritePath: /events}}
'''


def upstream_route_yaml() -> str:
    return f'''apiVersion: ssegate.io/v1alpha1
kind: SseRoute
metadata: {{name: upstream-tls, namespace: {NS}}}
spec:
  className: {CLASS}
  rules:
  - match: {{path: /upstream}}
    backend:
      service: secure-backend
      port: 443
      rewritePath: /events
      tls: {{enabled: true, caSecretName: backend-ca, serverName: backend.internal}}
'''


def served_cert(port: int, sni: str, cafile: pathlib.Path) -> bytes:
    """DER of the certificate the TLS listener serves for `sni` (verified against `cafile`,
    including the name)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(('127.0.0.1', port), timeout=3) as sock:
        with ctx.wrap_socket(sock, server_hostname=sni) as tls:
            return tls.getpeercert(binary_form=True)


def der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


class HttpsSseBackend:
    """An HTTPS (HTTP/1.0, close-delimited) SSE backend on BACKEND_IP: `GET /events?count=K`
    sends `id: N` / `data: secure N` every 100 ms."""

    def __init__(self, crt: pathlib.Path, key: pathlib.Path):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                count = int(query.get('count', ['1000000'])[0])
                self.send_response(200)
                self.send_header('Content-Type', 'text/event-stream')
                self.send_header('Cache-Control', 'no-cache')
                self.end_headers()
                try:
                    for n in range(1, count + 1):
                        self.wfile.write(f'id: {n}\ndata: secure {n}\n\n'.encode())
                        self.wfile.flush()
                        time.sleep(0.1)
                except (OSError, ssl.SSLError):
                    pass

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # refused handshakes (the wrong-CA check) are expected

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        self.server = Server((BACKEND_IP, 0), Handler)
        # The handshake runs in the request's thread, so a failing client cannot stall accept.
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True,
                                             do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def curl_tls(port: int, host: str, path: str, cafile: pathlib.Path, seconds: float = 5) -> tuple[list[str], str]:
    """Event ids and the HTTP version of `curl --http2` over the TLS listener, with SNI `host`."""
    r = subprocess.run(['curl', '-sN', '--http2', '-m', str(seconds), '--cacert', str(cafile),
                        '--resolve', f'{host}:{port}:127.0.0.1', '-w', '\n%{http_version}',
                        f'https://{host}:{port}{path}'], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    return [line for line in lines if line.startswith('id:')], (lines[-1] if lines else '')


def scenario_7(replicas: list[Replica], backend_port: int) -> None:
    log('7: TLS from Secrets (SNI, h2, rotation, a bad certificate, upstream TLS with an Opaque CA)')
    r = next(x for x in replicas if x.proc.poll() is None)
    make_ca('edge-ca')
    cafile = CERTS / 'edge-ca.crt'
    host = 'secure.example'
    crt1, key1 = make_leaf('edge-ca', 'secure-1', [host])
    apply(secret_yaml('secure-tls', 'kubernetes.io/tls', {'tls.crt': crt1, 'tls.key': key1}))
    apply(backend_objects('secure', 80, backend_port))
    # other.example is not in the certificate: served anyway, with a warning on the status.
    apply(tls_route_yaml('secure', [host, 'other.example'], 'secure-tls'))
    obj = wait_for(lambda: condition(o := route_obj('secure'), 'Ready').get('status') == 'True' and o,
                   'the TLS route is Ready', timeout=15)
    acc = condition(obj, 'Accepted')
    check(acc.get('status') == 'True' and 'does not cover other.example' in acc.get('message', ''),
          'the TLS route is Accepted; its message says the certificate does not cover other.example',
          json.dumps(acc))
    got = wait_for(lambda: served_cert(r.tls_port, host, cafile), f'a TLS handshake with SNI {host}')
    check(got == der(crt1), f'SNI {host} gets the certificate of Secret secure-tls')
    try:
        served_cert(r.tls_port, 'unknown.example', cafile)
        check(False, 'a name no route covers (and no default certificate) fails the handshake')
    except (ssl.SSLError, OSError):
        ok('a name no route covers (and no default certificate) fails the handshake')
    ids, version = curl_tls(r.tls_port, host, '/secure?interval=100ms&count=3', cafile)
    check(len(ids) == 3 and version == '2', 'curl --http2 over TLS receives the events on HTTP/2',
          f'{ids} over HTTP/{version}')

    log('7: rotate the certificate while a stream is open')
    path = WORK / 'tls-stream.out'
    out = open(path, 'w')
    stream = subprocess.Popen(['curl', '-sN', '--http2', '--cacert', str(cafile), '--resolve',
                               f'{host}:{r.tls_port}:127.0.0.1', f'https://{host}:{r.tls_port}/secure?interval=100ms'],
                              stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
    CHILDREN.append(stream)
    wait_for(lambda: count_events(path) >= 2, 'the stream over TLS flows')
    crt2, key2 = make_leaf('edge-ca', 'secure-2', [host])
    apply(secret_yaml('secure-tls', 'kubernetes.io/tls', {'tls.crt': crt2, 'tls.key': key2}))
    wait_for(lambda: served_cert(r.tls_port, host, cafile) == der(crt2),
             'new handshakes get the rotated certificate')
    ok('new handshakes get the rotated certificate')
    before = count_events(path)
    time.sleep(1.0)
    after = count_events(path)
    check(stream.poll() is None and after >= before + 5,
          'the stream opened before the rotation keeps receiving', f'{before} -> {after} events')

    log('7: a bad certificate')
    crt3, _ = make_leaf('edge-ca', 'secure-3', [host])
    apply(secret_yaml('secure-tls', 'kubernetes.io/tls', {'tls.crt': crt3, 'tls.key': key2}))
    obj = wait_for(lambda: condition(o := route_obj('secure'), 'Accepted').get('reason') == 'InvalidCertificate' and o,
                   'the route reports the bad certificate', timeout=15)
    acc = condition(obj, 'Accepted')
    check(acc.get('status') == 'False' and 'secure-tls' in acc.get('message', ''),
          'a key that does not match: Accepted=False, reason InvalidCertificate, names the Secret', json.dumps(acc))
    check(served_cert(r.tls_port, host, cafile) == der(crt2), 'the last good certificate is still served')
    before = count_events(path)
    time.sleep(0.6)
    check(stream.poll() is None and count_events(path) > before, 'the open stream still flows')
    stream.terminate()

    log('7: upstream TLS with a CA bundle from an Opaque Secret')
    make_ca('backend-ca')
    make_leaf('backend-ca', 'backend', ['backend.internal'])
    https = HttpsSseBackend(CERTS / 'backend.crt', CERTS / 'backend.key')
    try:
        apply(backend_objects('secure-backend', 443, https.port))
        apply(upstream_route_yaml())
        wait_for(lambda: condition(route_obj('upstream-tls'), 'ResolvedRefs').get('reason') == 'SecretNotFound',
                 'the route reports the missing CA Secret', timeout=15)
        ok('without the CA Secret: ResolvedRefs=False, SecretNotFound')
        # An Opaque Secret, as CA bundles usually are; keys ssegate does not read are ignored.
        apply(secret_yaml('backend-ca', 'Opaque', {'ca.crt': (CERTS / 'backend-ca.crt').read_text(),
                                                   'note': 'not read by ssegate'}))
        wait_for(lambda: condition(route_obj('upstream-tls'), 'ResolvedRefs').get('status') == 'True',
                 'the Opaque CA Secret resolves', timeout=15)
        ok('the Opaque CA Secret is seen: ResolvedRefs=True')
        events = wait_for(lambda: curl_events(r.url('/upstream?count=3'), 3), 'events from the HTTPS backend')
        check(len(events) == 3, 'events relayed from the HTTPS backend, verified with the Opaque CA', repr(events))
        # A CA that did not sign the backend's certificate: the handshake is refused.
        make_ca('other-ca')
        apply(secret_yaml('backend-ca', 'Opaque', {'ca.crt': (CERTS / 'other-ca.crt').read_text()}))
        wait_for(lambda: http_code(r.url('/upstream?count=1')) == '502', 'a wrong CA answers 502', timeout=15)
        ok('the CA Secret changed to a CA that did not sign the backend: 502')
    finally:
        https.close()


def check_rbac() -> None:
    """Every request ssegate made is allowed by the RBAC that manifests/install/ (generated from
    the chart) grants the Deployment's ServiceAccount: ClusterRoles in every namespace, Roles only
    in their own. The replicas here keep their Lease in NS, which stands in for the install
    namespace (where the Deployment runs and the chart puts its leases Role)."""
    objs = [o for f in sorted((REPO / 'manifests/install').glob('*.yaml'))
            for o in yaml.safe_load_all(f.read_text()) if o]
    (deploy,) = [o for o in objs if o['kind'] == 'Deployment']
    install_ns = deploy['metadata']['namespace']
    sa = deploy['spec']['template']['spec']['serviceAccountName']
    roles = {(o['kind'], o['metadata'].get('namespace'), o['metadata']['name']): o
             for o in objs if o['kind'] in ('ClusterRole', 'Role')}
    allowed = set()  # (namespace, or None for all; group, resource, verb)
    for b in objs:
        if b['kind'] not in ('ClusterRoleBinding', 'RoleBinding') or not any(
                s['kind'] == 'ServiceAccount' and s['name'] == sa and s.get('namespace') == install_ns
                for s in b['subjects']):
            continue
        scope = None if b['kind'] == 'ClusterRoleBinding' else b['metadata']['namespace']
        ref = b['roleRef']
        role = roles[(ref['kind'], scope if ref['kind'] == 'Role' else None, ref['name'])]
        if scope == install_ns:
            scope = NS
        allowed |= {(scope, g, res, v) for rule in role['rules'] for g in rule['apiGroups']
                    for res in rule['resources'] for v in rule['verbs']}
    used = set()
    for line in (WORK / 'audit.jsonl').read_text().splitlines():
        req = json.loads(line)
        if req['user'] != SSEGATE_TOKEN:
            continue
        parts = req['path'].strip('/').split('/')
        if parts[0] == 'api':
            group, rest = '', parts[2:]
        elif parts[0] == 'apis':
            group, rest = parts[1], parts[3:]
        else:
            continue  # non-resource URLs (/version ...) are open to every authenticated user
        ns = None
        if rest[:1] == ['namespaces'] and len(rest) > 2:
            ns, rest = rest[1], rest[2:]
        resource = rest[0] + (f'/{rest[2]}' if len(rest) > 2 else '')
        named = len(rest) > 1
        verb = {'GET': 'watch' if 'watch=' in req['query'] and 'watch=false' not in req['query']
                else ('get' if named else 'list'),
                'POST': 'create', 'PUT': 'update', 'PATCH': 'patch', 'DELETE': 'delete'}[req['method']]
        used.add((ns, group, resource, verb))
    missing = sorted((u for u in used if (None, *u[1:]) not in allowed and u not in allowed),
                     key=str)
    check(not missing, 'every API request of ssegate is allowed by the RBAC in manifests/install/',
          str(missing))
    log(f'ssegate used: {sorted(used, key=str)}')


# ------------------------------------------------------------------------------ default certificate files (scenario 8)

def scenario_8() -> None:
    log('8: --default-cert/--default-key files in cluster mode: served, reloaded on edit, a bad edit keeps the last good')
    make_ca('default-ca')
    cafile = CERTS / 'default-ca.crt'
    host = 'nothing-routes-this.example'
    crt1, key1 = make_leaf('default-ca', 'default-1', [host])
    crt2, key2 = make_leaf('default-ca', 'default-2', [host])
    crt_file, key_file = CERTS / 'default.crt', CERTS / 'default.key'
    crt_file.write_text(crt1)
    key_file.write_text(key1)
    r = Replica('ssegate-c', ('--default-cert', str(crt_file), '--default-key', str(key_file)))
    try:
        wait_for(r.ready, 'ssegate-c (with --default-cert) is ready', timeout=20)
        got = wait_for(lambda: served_cert(r.tls_port, host, cafile), f'a TLS handshake with SNI {host}')
        check(got == der(crt1), 'a name no route covers gets the --default-cert certificate')
        # Renewed in place, key first (as a careful operator would); the pair is re-read.
        key_file.write_text(key2)
        crt_file.write_text(crt2)
        wait_for(lambda: served_cert(r.tls_port, host, cafile) == der(crt2),
                 'the edited --default-cert files are served', timeout=15)
        ok('the edited --default-cert files are served without a restart')
        log_file = WORK / 'ssegate-c.log'
        unusable = 'default certificate Secret is unusable'
        before = log_file.read_text().count(unusable)
        crt_file.write_text('-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n')
        wait_for(lambda: log_file.read_text().count(unusable) > before, 'the bad edit is logged', timeout=15)
        check(served_cert(r.tls_port, host, cafile) == der(crt2),
              'after a bad edit the last good default certificate is still served')
    finally:
        r.proc.terminate()
        try:
            r.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            r.proc.kill()


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    failed = None
    replicas: list[Replica] = []
    try:
        backend_port, replicas = setup()
        scenario_1(replicas)
        scenario_2(backend_port, replicas)
        scenario_3(replicas)
        scenario_4(replicas, backend_port)
        scenario_5(replicas)
        scenario_6(replicas, backend_port)
        scenario_7(replicas, backend_port)
        scenario_8()
        if not REAL:
            check_rbac()
    except CheckFailed as e:
        failed = str(e)
    finally:
        for p in reversed(CHILDREN):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        if REAL and KUBECONFIG:
            kubectl('delete', 'namespace', NS, '--wait=false', check_rc=False)
    if failed:
        global FAILED
        FAILED += 1
        print(f'FAIL - {failed}', flush=True)
        for r in replicas:
            print(f'--- last lines of {r.name}.log', flush=True)
            print('\n'.join((WORK / f'{r.name}.log').read_text().splitlines()[-25:]), flush=True)
    print(f'{PASSED} passed, {FAILED} failed', flush=True)
    return 1 if FAILED else 0


if __name__ == '__main__':
    sys.exit(main())
