#!/usr/bin/env python3
"""e2e: the Helm chart's rendered objects against the API server emulator, and ssegate started
exactly as the rendered Deployment starts it.

    cargo build --release --bin ssegate --example sse-backend
    .venv/bin/python e2e/chart/run.py [--values charts/ssegate/ci/X-values.yaml]   # or: scripts/test

1. Starts the emulator (e2e/apiserver), renders the chart (`helm template`, CRDs included) and
   `kubectl apply --validate=false`s every object into namespace `ssegate`; each must then exist.
2. Applies a demo route: Service + EndpointSlice pointing at a local sse-backend, and an SseRoute.
3. Reads the rendered Deployment's container `args` and `env` and starts the release ssegate
   binary with them. Nothing is retyped; only what cannot be the same outside a cluster is
   substituted, and nothing else:
   - the image's entrypoint (`/ssegate`) -> $CARGO_TARGET_DIR/release/ssegate;
   - the address of `--listen`, `--admin` and `--listen-tls` -> 127.0.0.1:<free port> (the flag
     names stay, so a flag renamed in the binary but not in the chart fails here; `off` stays);
   - the in-cluster ServiceAccount config -> KUBECONFIG pointing at the emulator, its context
     namespace set to the release namespace (what in-cluster config defaults to);
   - `valueFrom` env (downward API) -> the value the kubelet would give: metadata.name ->
     `ssegate-e2e-0`, metadata.namespace -> `ssegate`; any other source fails the test.
   The process environment is otherwise empty except PATH and HOME, so no SSEGATE_* variable of
   the caller leaks in.
4. ssegate must become ready (/readyz) and stream the demo route's events; the route's status
   gets Ready=True (written by the elected replica), and its Lease is in the release namespace,
   where the chart's leases Role is. With `--namespace` (namespaced RBAC values) the route lives
   in that namespace, and a route in another namespace is neither served nor given a status.
5. SIGTERM, as the kubelet sends it (the chart has no preStop hook): /readyz fails at once, an
   open stream gets a `retry:` hint and ends cleanly within the drain, and ssegate exits 0
   before the rendered pod's terminationGracePeriodSeconds (when the kubelet would SIGKILL it).

Logs: e2e/.work/chart/. Ends with "N passed, M failed".
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import chart  # noqa: E402  (scripts/chart.py: render(), the one way the chart is rendered)

TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
if not TARGET.is_absolute():
    TARGET = REPO / TARGET
SSEGATE = TARGET / "release" / "ssegate"
BACKEND = TARGET / "release" / "examples" / "sse-backend"
WORK = REPO / "e2e" / ".work" / "chart"
PY = sys.executable
ENTRYPOINT = "/ssegate"  # the Dockerfile's ENTRYPOINT
ADDRESS_FLAGS = ("listen", "admin", "listen-tls")
POD_FIELDS = {"metadata.name": "ssegate-e2e-0", "metadata.namespace": chart.NAMESPACE}
TIMEOUT = float(os.environ.get("SSEGATE_E2E_TIMEOUT", "60"))

passed = 0
children = []


class Failed(Exception):
    pass


def ok(what):
    global passed
    passed += 1
    print(f"ok {passed} - {what}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name, cmd, env=None):
    log = open(WORK / f"{name}.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=WORK)
    children.append((name, p))
    return p


def tail(name, n=25):
    try:
        return "\n".join((WORK / f"{name}.log").read_text().splitlines()[-n:])
    except OSError:
        return ""


def eventually(what, probe, timeout=TIMEOUT, proc=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc[1].poll() is not None:
            raise Failed(f"{what}: {proc[0]} exited with {proc[1].returncode}:\n{tail(proc[0])}")
        try:
            result = probe()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.2)
    raise Failed(f"{what}: not within {timeout} s (last: {last!r})")


def kubectl(*args, stdin=None):
    r = subprocess.run(["kubectl", "--request-timeout=10s", *args], input=stdin, text=True,
                       capture_output=True, env=KENV)
    if r.returncode != 0:
        raise Failed(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def http_get(addr, path, timeout=5):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    c.request("GET", path)
    return c, c.getresponse()


# ---------------------------------------------------------------- the pod, outside a cluster

def pod_command(deploy):
    """The rendered container's argv and env, with only the documented substitutions."""
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    if c.get("command"):
        raise Failed(f"the chart overrides the image entrypoint ({c['command']}); adapt the substitution")
    argv, addrs = [str(SSEGATE)], {}
    for a in c["args"]:
        name, eq, value = a.partition("=")
        if eq and name[2:] in ADDRESS_FLAGS and value != "off":
            addrs[name[2:]] = f"127.0.0.1:{free_port()}"
            a = f"{name}={addrs[name[2:]]}"
        argv.append(a)
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") in POD_FIELDS:
            env[e["name"]] = POD_FIELDS[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise Failed(f"env {e['name']}: no local equivalent for {e}")
    return argv, env, addrs


def demo_objects(backend_port, ns, path="/ticks"):
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ticks", "namespace": ns},
         "spec": {"ports": [{"name": "http", "port": 80, "targetPort": backend_port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "ticks-local", "namespace": ns, "labels": {"kubernetes.io/service-name": "ticks"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": backend_port, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
        {"apiVersion": "ssegate.io/v1alpha1", "kind": "SseRoute", "metadata": {"name": "ticks", "namespace": ns},
         "spec": {"rules": [{"match": {"path": path}, "backend": {"service": "ticks", "port": 80, "rewritePath": "/events"}}]}},
    ]


# ---------------------------------------------------------------- scenario

def scenario(values):
    # 1. The emulator.
    ready = WORK / "apiserver.ready"
    kubeconfig = WORK / "kubeconfig"
    ready.unlink(missing_ok=True)
    api = spawn("apiserver", [PY, str(REPO / "e2e" / "apiserver" / "server.py"), "--port", "0",
                              "--kubeconfig-out", str(kubeconfig), "--ready-file", str(ready)])
    eventually("the API server emulator starts", lambda: ready.exists() and ready.read_text().strip(),
               proc=("apiserver", api))
    KENV.update(KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(WORK / "kube-cache"), HOME=str(WORK))
    kubectl("config", "set-context", "--current", f"--namespace={chart.NAMESPACE}")
    ok("API server emulator up")

    # 2. Every rendered object applies.
    rendered = chart.render(values, include_crds=True)
    (WORK / "rendered.yaml").write_text(rendered)
    objs = chart.docs(rendered)
    kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": chart.NAMESPACE}}))
    for ns in {o["metadata"].get("namespace") for o in objs} - {None, chart.NAMESPACE}:
        kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
    out = kubectl("apply", "--validate=false", "-f", str(WORK / "rendered.yaml"))
    applied = [line for line in out.splitlines() if line.strip()]
    if len(applied) != len(objs):
        raise Failed(f"{len(objs)} objects rendered, kubectl applied {len(applied)}:\n{out}")
    names = kubectl("get", "-f", str(WORK / "rendered.yaml"), "-o", "name").split()
    if len(names) != len(objs):
        raise Failed(f"{len(objs)} objects rendered, {len(names)} readable back: {names}")
    ok(f"all {len(objs)} rendered objects applied and readable ({', '.join(sorted({o['kind'] for o in objs}))})")

    # 3. A backend and a route to it.
    backend_port = free_port()
    backend = spawn("sse-backend", [str(BACKEND), "--listen", f"127.0.0.1:{backend_port}"])
    eventually("the sse-backend listens", lambda: socket.create_connection(("127.0.0.1", backend_port), 1).close() or True,
               proc=("sse-backend", backend))
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    argv, env, addrs = pod_command(deploy)
    # With --namespace (namespaced RBAC), the route lives in the watched namespace, and a route
    # elsewhere must not be served.
    watched = [a.split("=", 1)[1] for a in argv if a.startswith("--namespace=")]
    ns = watched[0] if watched else "demo"
    kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump_all(demo_objects(backend_port, ns)))
    if watched:
        kubectl("apply", "--validate=false", "-f", "-",
                stdin=yaml.safe_dump_all(demo_objects(backend_port, "unwatched", "/elsewhere")))
    ok(f"demo Service, EndpointSlice and SseRoute applied in namespace {ns}")

    # 4. ssegate, as the Deployment runs it.
    (WORK / "ssegate.cmd").write_text(json.dumps({"argv": argv, "env": env}, indent=2))
    if "listen" not in addrs or "admin" not in addrs:
        raise Failed(f"the rendered args set no --listen/--admin address: {argv}")
    gate = spawn("ssegate", argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(WORK),
                                       "KUBECONFIG": str(kubeconfig), **env})
    proc = ("ssegate", gate)
    ok(f"ssegate started with the Deployment's args: {' '.join(argv[1:])}")

    def ready_probe():
        c, r = http_get(addrs["admin"], "/readyz", timeout=2)
        c.close()
        return r.status == 200
    eventually("ssegate becomes ready (/readyz)", ready_probe, proc=proc)
    ok("/readyz is 200")

    def stream_probe():
        c, r = http_get(addrs["listen"], "/ticks?interval=100ms", timeout=5)
        try:
            if r.status != 200:
                return False
            got = b""
            while b"event: tick" not in got:
                line = r.fp.readline()
                if not line:
                    return False
                got += line
            return r.getheader("content-type", "").startswith("text/event-stream")
        finally:
            c.close()
    eventually("the route streams events through ssegate", stream_probe, proc=proc)
    ok("GET /ticks streams the backend's events through ssegate")

    def status_probe():
        route = json.loads(kubectl("get", "sseroutes.ssegate.io", "ticks", "-n", ns, "-o", "json"))
        conds = {c["type"]: c["status"] for c in route.get("status", {}).get("conditions", [])}
        return conds.get("Ready") == "True"
    eventually("the route's status becomes Ready=True", status_probe, proc=proc)
    ok(f"SseRoute {ns}/ticks has Ready=True")

    if watched:
        c, r = http_get(addrs["listen"], "/elsewhere", timeout=5)
        c.close()
        if r.status != 404:
            raise Failed(f"a route outside --namespace={ns} is served (status {r.status})")
        route = json.loads(kubectl("get", "sseroutes.ssegate.io", "ticks", "-n", "unwatched", "-o", "json"))
        if route.get("status"):
            raise Failed(f"a route outside --namespace={ns} got a status: {route['status']}")
        ok(f"a route outside namespace {ns} is neither served nor given a status")

    # The leader-election Lease is where the chart's Role allows it (the release namespace).
    leases = kubectl("get", "leases.coordination.k8s.io", "-n", chart.NAMESPACE, "-o", "name").split()
    if not leases:
        raise Failed(f"no Lease in the release namespace {chart.NAMESPACE} (the chart's Role covers only there)")
    ok(f"leader-election Lease in namespace {chart.NAMESPACE}: {', '.join(leases)}")

    # 5. The drain, bounded by the pod's terminationGracePeriodSeconds.
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    c, r = http_get(addrs["listen"], "/ticks?interval=100ms", timeout=grace)
    head = [r.readline() for _ in range(20)] if r.status == 200 else []
    if b"event: tick\n" not in head:
        raise Failed(f"no stream open before SIGTERM (status {r.status}): {head}")
    started = time.monotonic()
    gate.send_signal(signal.SIGTERM)

    def not_ready():
        c2, r2 = http_get(addrs["admin"], "/readyz", timeout=2)
        c2.close()
        return r2.status == 503
    eventually("/readyz fails after SIGTERM", not_ready, timeout=2)
    ok("SIGTERM: /readyz is 503 at once")
    tail_lines = []
    while True:
        line = r.readline()
        if not line:
            break
        tail_lines.append(line)
    c.close()
    if not any(line.startswith(b"retry:") for line in tail_lines):
        raise Failed(f"the drained stream ended without a retry: hint: {tail_lines[-5:]}")
    try:
        code = gate.wait(timeout=max(0.0, grace - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        raise Failed(f"ssegate still running {grace} s after SIGTERM (terminationGracePeriodSeconds): "
                     "the kubelet would SIGKILL it") from None
    if code != 0:
        raise Failed(f"ssegate exited with {code} after SIGTERM:\n{tail('ssegate')}")
    ok(f"SIGTERM: the open stream got a retry: hint and ended; ssegate exited 0 after "
       f"{time.monotonic() - started:.1f} s, within terminationGracePeriodSeconds ({grace} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=Path, help="a values file (default: the chart's defaults)")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    for b in (SSEGATE, BACKEND, chart.HELM):
        if not b.exists():
            sys.exit(f"{b} missing: cargo build --release --bin ssegate --example sse-backend; scripts/test installs helm")
    failed = 0
    try:
        scenario(args.values.resolve() if args.values else None)
    except (Failed, chart.CheckError) as e:
        failed = 1
        print(f"FAIL: {e}", flush=True)
        for name, _ in children:
            print(f"--- {name} log (tail):\n{tail(name)}", flush=True)
    finally:
        for _, c in reversed(children):
            if c.poll() is None:
                c.terminate()
                try:
                    c.wait(10)
                except subprocess.TimeoutExpired:
                    c.kill()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


KENV = dict(os.environ)

if __name__ == "__main__":
    main()
