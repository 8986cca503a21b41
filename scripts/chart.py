#!/usr/bin/env python3
"""The Helm chart's generated files and checks (run by scripts/test; needs .tools/helm and .venv).

    .venv/bin/python scripts/chart.py generate            # rewrite the generated files
    .venv/bin/python scripts/chart.py check --ssegate BIN  # everything scripts/test checks

Generated (committed, and compared with a fresh generation by `check`):
  charts/ssegate/crds/*.yaml         copy of crds/ (made by `ssegate crdgen`)
  manifests/grafana/ssegate-dashboard.json   copy of charts/ssegate/files/dashboard.json
  manifests/install.yaml             `helm template` of the default values, CRDs included
  manifests/install/*.yaml           `helm template` with manifests/install-values.yaml, one file
                                     per kind, and the Namespace; CRDs stay in crds/

`check` also: `helm lint --strict` and `helm template` of the default values and of every
charts/ssegate/ci/*-values.yaml; validates every rendered object with kubernetes-validate in
strict mode (unknown fields are errors) for the oldest and newest Kubernetes the chart supports;
asserts what each values file must render (kinds, exact RBAC, hardened pod, flags known to the
binary); proves values.schema.json rejects bad values; checks the dashboard's metric names
against src/; validates every SseRoute in manifests/ against the CRD's openAPIV3Schema.
"""

import argparse
import copy
import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "ssegate"
HELM = REPO / ".tools" / "helm"
RELEASE, NAMESPACE = "ssegate", "ssegate"
INSTALL_YAML = REPO / "manifests" / "install.yaml"
# manifests/install/: the chart rendered with these values, one file per kind, plus the Namespace
# (`kubectl apply -f crds/ -f manifests/install/`; e2e/controller checks ssegate's API requests
# against its RBAC).
INSTALL_DIR = REPO / "manifests" / "install"
INSTALL_VALUES = REPO / "manifests" / "install-values.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
DASHBOARD_COPY = REPO / "manifests" / "grafana" / "ssegate-dashboard.json"
# Kubernetes versions the rendered objects are validated against: the chart's kubeVersion floor
# and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
# Kinds that are CRDs of other projects: kubernetes-validate has no schema for them. The
# ServiceMonitor is checked by the assertions in expect() instead.
FOREIGN_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Flags the chart renders (with some values file) and metrics the dashboard shows that are not in
# the binary on this branch yet, and the work that adds them. `check` fails when one of these has
# landed (so the entry is removed) and when anything not listed here is missing.
PENDING_FLAGS = {}
PENDING_METRICS = {}

# The RBAC the controller needs, exactly (issue 5).
WATCH_RULES = {
    ("ssegate.io", "sseroutes"): {"get", "list", "watch"},
    ("ssegate.io", "sseroutes/status"): {"patch"},
    ("", "services"): {"list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("", "secrets"): {"list", "watch"},
}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


class CheckError(Exception):
    """A failed check, with a message saying what and where."""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def helm(*args):
    try:
        return run([str(HELM), *args])
    except subprocess.CalledProcessError as e:
        raise CheckError(f"helm {' '.join(args)} failed:\n{e.stdout}{e.stderr}") from None


def render(values=None, include_crds=False, extra=()):
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if include_crds:
        args.append("--include-crds")
    if values:
        args += ["-f", str(values)]
    return helm(*args, *extra)


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def ci_values():
    return sorted(CHART.glob("ci/*-values.yaml"))


# ---------------------------------------------------------------- values documentation

def values_doc():
    """[(dotted key, default, description)] from values.yaml's `# --` comments (helm-docs style):
    every key needs one, except a map whose keys all have their own."""
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    rows, stack, pending, undocumented = [], [], None, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^(\s*)# -- (.*)$", line)
        if m:
            pending = m.group(2)
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            if line.strip() and not line.lstrip().startswith("#") and not line.lstrip().startswith("-"):
                pending = None
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and stack[-1][2]:
            continue  # inside a documented value (e.g. the default of `resources`)
        stack.append((indent, m.group(2), pending is not None))
        key = ".".join(k for _, k, _ in stack)
        node = values
        for part in key.split("."):
            node = node[part]
        if pending is not None:
            rows.append((key, node, pending))
        elif not isinstance(node, dict) or not node:
            undocumented.append(f"values.yaml:{n}: {key}")
        pending = None
    if undocumented:
        raise CheckError("values without a `# --` comment:\n  " + "\n  ".join(undocumented))
    return rows


def values_table():
    out = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, default, desc in values_doc():
        shown = json.dumps(default, separators=(", ", ": ")) if default not in ("", None) else ('`""`' if default == "" else "`null`")
        if not shown.startswith("`"):
            shown = f"`{shown}`"
        cells = [f"`{key}`", shown, desc]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def with_values_table(readme):
    start, end = "<!-- values:start -->\n", "<!-- values:end -->"
    i, j = readme.index(start) + len(start), readme.index(end)
    return readme[:i] + values_table() + readme[j:]


# ---------------------------------------------------------------- generated files

def generated():
    """Path -> content of every generated file."""
    out = {}
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        out[CHART / "crds" / crd.name] = crd.read_text()
    out[DASHBOARD_COPY] = DASHBOARD.read_text()
    out[CHART / "README.md"] = with_values_table((CHART / "README.md").read_text())
    for name, content in install_dir().items():
        out[INSTALL_DIR / name] = content
    out[INSTALL_YAML] = (
        "# Generated by `scripts/chart.py generate`: `helm template ssegate charts/ssegate\n"
        "# --namespace ssegate --include-crds` with the default values. Do not edit; change the chart.\n"
        "#   kubectl create namespace ssegate && kubectl apply --server-side -f manifests/install.yaml\n"
        + render(include_crds=True)
    )
    return out


def install_dir():
    """manifests/install/: file name -> content."""
    header = ("# Generated by `scripts/chart.py generate`: charts/ssegate rendered with\n"
              "# manifests/install-values.yaml. Do not edit; change the chart or those values.\n"
              "#   kubectl apply -f crds/ -f manifests/install/\n")
    files = {"00-namespace.yaml": header + yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, sort_keys=False)}
    by_file = {}
    for chunk in re.split(r"^---\s*$", render(INSTALL_VALUES), flags=re.M):
        obj = yaml.safe_load(chunk)
        if not obj:
            continue
        if obj.get("metadata", {}).get("namespace", NAMESPACE) != NAMESPACE and obj["kind"] not in ("Role", "RoleBinding"):
            raise CheckError(f"{INSTALL_VALUES.name} renders {obj['kind']} outside namespace {NAMESPACE}")
        by_file.setdefault(f"{obj['kind'].lower()}.yaml", []).append(chunk.strip("\n") + "\n")
    for name, chunks in sorted(by_file.items()):
        files[name] = header + "---\n" + "---\n".join(chunks)
    return files


def cmd_generate(_args):
    # The chart's CRD copies first: manifests/install.yaml is rendered from the chart.
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        (CHART / "crds").mkdir(exist_ok=True)
        (CHART / "crds" / crd.name).write_text(crd.read_text())
    for path, content in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path.relative_to(REPO)}")
    want = set(generated())
    stale = (set((CHART / "crds").glob("*.yaml")) | set(INSTALL_DIR.glob("*.yaml"))) - want
    for path in stale:
        path.unlink()
        print(f"removed {path.relative_to(REPO)}")


def check_fresh():
    want = generated()
    problems = []
    for path, content in want.items():
        have = path.read_text() if path.exists() else ""
        if have != content:
            diff = "".join(difflib.unified_diff(
                have.splitlines(True), content.splitlines(True),
                str(path.relative_to(REPO)), "generated", n=1))
            problems.append(diff[:3000])
    extra = set((CHART / "crds").glob("*.yaml")) - set(want)
    problems += [f"{p.relative_to(REPO)} has no source in crds/" for p in extra]
    extra = set(INSTALL_DIR.glob("*")) - set(want)
    problems += [f"{p.relative_to(REPO)} is not generated from the chart" for p in extra]
    if problems:
        raise CheckError("generated files are stale: run `.venv/bin/python scripts/chart.py generate`\n"
                         + "\n".join(problems))
    print(f"generated files fresh: {len(want)}")


# ---------------------------------------------------------------- rendered objects

def kube_validate(objs, label):
    n = 0
    for obj in objs:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in FOREIGN_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                raise CheckError(f"{label}: {obj['kind']} {obj['metadata'].get('name')} is invalid "
                                 f"for Kubernetes {version} at {path}: {e.message}") from None
        n += 1
    return n


def by_kind(objs):
    out = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def rules_of(role):
    got = {}
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                got.setdefault((g, res), set()).update(r["verbs"])
    return got


def container(objs):
    (deploy,) = by_kind(objs)["Deployment"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return deploy, c


def flags_of(args):
    """`run --a=b --c=d` -> {"a": ["b"], "c": ["d"]}."""
    if not args or args[0] != "run":
        raise CheckError(f"container args must start with `run`: {args}")
    out = {}
    for a in args[1:]:
        m = re.fullmatch(r"--([a-z0-9][a-z0-9-]*)(?:=(.*))?", a)
        if not m:
            raise CheckError(f"argument {a!r} is not --flag=value")
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def expect(label, values, objs, binary_flags):
    """What a values file must render."""
    kinds = by_kind(objs)
    fail = lambda msg: (_ for _ in ()).throw(CheckError(f"{label}: {msg}"))  # noqa: E731
    deploy, c = container(objs)
    pod = deploy["spec"]["template"]["spec"]

    # Hardened pod.
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        fail("container may run as root")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail("root filesystem is writable")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail("privilege escalation allowed")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        fail("capabilities not all dropped")
    if not c.get("resources", {}).get("requests"):
        fail("no resource requests")
    probes = {p: c.get(p, {}).get("httpGet", {}) for p in ("livenessProbe", "readinessProbe")}
    if probes["livenessProbe"].get("path") != "/healthz" or probes["readinessProbe"].get("path") != "/readyz":
        fail(f"probes must be /healthz (liveness) and /readyz (readiness): {probes}")
    if pod.get("automountServiceAccountToken") is not True:
        fail("the controller needs its ServiceAccount token")

    # Flags: every flag is one the binary knows (or is pending on another branch).
    flags = flags_of(c["args"])
    unknown = sorted(f for f in flags if f not in binary_flags and f not in PENDING_FLAGS)
    if unknown:
        fail(f"flags not known to `ssegate run --help`: {unknown} (renamed in the binary? fix _helpers.tpl)")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for flag, port in (("listen", "http"), ("admin", "admin"), ("listen-tls", "https")):
        if port in ports and not any(v.endswith(f":{ports[port]}") for v in flags.get(flag, [])):
            fail(f"--{flag} does not bind containerPort {port} ({ports[port]})")
    if "https" not in ports and flags.get("listen-tls") != ["off"]:
        fail(f"without a TLS port the TLS listener must be off (--listen-tls=off), not {flags.get('listen-tls')}")

    workers = values.get("controller", {}).get("workers")
    if flags.get("workers") != ([str(workers)] if workers else None):
        fail(f"--workers {flags.get('workers')} does not follow controller.workers ({workers})")

    # Drain: the kubelet's SIGKILL (terminationGracePeriodSeconds) comes after ssegate's own
    # --grace-period, with room for releasing the Lease (up to 3 s); the drain closes streams
    # between --drain-delay and the grace period. No preStop hook: ssegate drains on SIGTERM.
    drain = {}
    for flag in ("drain-delay", "drain-window", "grace-period"):
        if len(flags.get(flag, [])) != 1:
            fail(f"--{flag} must be rendered exactly once: {flags.get(flag)}")
        drain[flag] = go_seconds(flags[flag][0])
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps < drain["grace-period"] + 5:
        fail(f"terminationGracePeriodSeconds {tgps} leaves no room after --grace-period={flags['grace-period'][0]}")
    if drain["grace-period"] <= drain["drain-delay"]:
        fail("--grace-period ends before the drain starts closing streams (--drain-delay)")
    if "lifecycle" in c:
        fail(f"unexpected lifecycle hooks (ssegate drains on SIGTERM by itself): {c['lifecycle']}")

    # Replicas, PDB, HPA.
    auto = values.get("autoscaling", {}).get("enabled", False)
    min_replicas = values.get("autoscaling", {}).get("minReplicas", 2) if auto else values.get("replicaCount", 1)
    if ("PodDisruptionBudget" in kinds) != (min_replicas > 1):
        fail(f"PodDisruptionBudget must exist exactly when more than one replica runs (min {min_replicas})")
    if ("HorizontalPodAutoscaler" in kinds) != auto:
        fail("HorizontalPodAutoscaler must exist exactly when autoscaling.enabled")
    if auto and "replicas" in deploy["spec"]:
        fail("Deployment must not pin replicas under an HPA")
    if "topologySpreadConstraints" not in pod:
        fail("pods are not spread across nodes")

    # The Lease is where the leader-election Role allows it.
    if flags.get("lease-namespace") != [NAMESPACE]:
        fail(f"--lease-namespace must be the release namespace (where the leases Role is): {flags.get('lease-namespace')}")

    # RBAC: exactly the rules the controller needs, in the right scope.
    namespaces = values.get("controller", {}).get("watchNamespaces", [])
    sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
             for r in kinds.get("ClusterRole", []) + kinds.get("Role", [])}
    bindings = kinds.get("ClusterRoleBinding", []) + kinds.get("RoleBinding", [])
    granted = {}
    for b in bindings:
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
                   for s in b["subjects"]):
            fail(f"{b['kind']} {b['metadata']['name']} binds someone else")
        ref = b["roleRef"]
        scope = None if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        role = roles.get((ref["kind"], None if ref["kind"] == "ClusterRole" else scope, ref["name"]))
        if role is None:
            fail(f"{b['kind']} {b['metadata']['name']} refers to a missing {ref['kind']}")
        granted[scope] = rules_of(role)
    want = {NAMESPACE: LEASE_RULES}
    if namespaces:
        for ns in namespaces:
            want[ns] = {**want.get(ns, {}), **WATCH_RULES}
    else:
        want[None] = WATCH_RULES
    if granted != want:
        fail(f"RBAC is not least privilege:\n  granted {granted}\n  wanted  {want}")

    # Services.
    svcs = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
    proxy = next((s for s in svcs.values() if s["metadata"]["labels"].get("app.kubernetes.io/component") == "proxy"), None)
    if proxy is None:
        fail("no proxy Service")
    names = {p["name"] for p in proxy["spec"]["ports"]}
    if names != ({"http", "https"} if "https" in ports else {"http"}):
        fail(f"proxy Service ports {names} do not match the container's listeners")
    if proxy["spec"]["type"] in ("LoadBalancer", "NodePort") and "externalTrafficPolicy" not in proxy["spec"]:
        fail("externalTrafficPolicy missing")
    sm_on = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    if ("ServiceMonitor" in kinds) != sm_on:
        fail("ServiceMonitor must exist exactly when metrics.serviceMonitor.enabled")
    if sm_on:
        (sm,) = kinds["ServiceMonitor"]
        metrics_svc = next(s for s in svcs.values() if s["metadata"]["labels"].get("app.kubernetes.io/component") == "metrics")
        sel = sm["spec"]["selector"]["matchLabels"]
        if any(metrics_svc["metadata"]["labels"].get(k) != v for k, v in sel.items()):
            fail("the ServiceMonitor does not select the metrics Service")
        if sel.get("app.kubernetes.io/component") != "metrics":
            fail("the ServiceMonitor also selects the proxy Service")
        if {e["port"] for e in sm["spec"]["endpoints"]} != {p["name"] for p in metrics_svc["spec"]["ports"]}:
            fail("the ServiceMonitor scrapes a port the metrics Service does not have")
    dash_on = values.get("dashboard", {}).get("enabled", False)
    cms = [m for m in kinds.get("ConfigMap", []) if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if bool(cms) != dash_on:
        fail("the dashboard ConfigMap (grafana_dashboard: \"1\") must exist exactly when dashboard.enabled")
    if dash_on and json.loads(next(iter(cms[0]["data"].values()))) != json.loads(DASHBOARD.read_text()):
        fail("the dashboard ConfigMap does not carry files/dashboard.json")
    if ("NetworkPolicy" in kinds) != values.get("networkPolicy", {}).get("enabled", False):
        fail("NetworkPolicy must exist exactly when networkPolicy.enabled")


def go_seconds(text):
    """A Go-style duration (`1m30s`, `250ms`, as `ssegate run` parses them) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise CheckError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def binary_flags(ssegate):
    text = run([ssegate, "run", "--help"])
    return set(re.findall(r"--([a-z0-9][a-z0-9-]+)", text)) - {"help"}


def check_pending(flags):
    landed = sorted(f for f in PENDING_FLAGS if f in flags)
    if landed:
        raise CheckError(f"flags {landed} are in the binary now: remove them from PENDING_FLAGS in scripts/chart.py")


def check_schema_rejects():
    """values.schema.json turns wrong values into clear errors."""
    cases = [
        ("replicaCount=two", "replicaCount"),
        ("controller.logFormat=xml", "logFormat"),
        ("servce.type=LoadBalancer", "servce"),
        ("service.type=Ingress", "service.type"),
        ("tls.defaultCertSecret=noslash", "defaultCertSecret"),
        ("ports.http.containerPort=70000", "containerPort"),
        ("controller.watchNamespaces={a,b}", "watchNamespaces"),
        ("leaderElection.leaseDuration=15", "leaseDuration"),
        ("drain.windowSeconds=30s", "windowSeconds"),
        ("controller.workers=0", "workers"),
        ("drain.terminationMarginSeconds=1", "terminationMarginSeconds"),
        ("terminationGracePeriodSeconds=120", "terminationGracePeriodSeconds"),
    ]
    for setting, needle in cases:
        try:
            helm("lint", "--strict", str(CHART), "--set", setting)
        except CheckError as e:
            if needle not in str(e):
                raise CheckError(f"`--set {setting}` failed, but the error does not name {needle}:\n{e}") from None
            continue
        raise CheckError(f"values.schema.json accepts `--set {setting}`")
    # What the schema cannot say (relations between values) the templates `fail` on; `helm lint`
    # only reports those as INFO, `helm template`/`install` fail.
    rendered = [("drain.gracePeriodSeconds=5", "drain.gracePeriodSeconds (5) must be greater than drain.delaySeconds (5)")]
    for setting, needle in rendered:
        try:
            render(extra=("--set", setting))
        except CheckError as e:
            if needle not in str(e):
                raise CheckError(f"`--set {setting}` failed, but the error does not say {needle!r}:\n{e}") from None
            continue
        raise CheckError(f"the chart renders `--set {setting}`")
    print(f"values.schema.json and the templates reject {len(cases) + len(rendered)} bad values with clear errors")


# ---------------------------------------------------------------- dashboard

def check_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    used = set(re.findall(r"\bssegate_[a-z_]+\b", DASHBOARD.read_text()))
    source = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.rs"))
    defined = set(re.findall(r'"(ssegate_[a-z_]+)"', source))
    missing = sorted(used - defined - set(PENDING_METRICS))
    if missing:
        raise CheckError(f"the dashboard queries metrics ssegate does not export: {missing}")
    landed = sorted(m for m in PENDING_METRICS if m in defined)
    if landed:
        raise CheckError(f"metrics {landed} are exported now: remove them from PENDING_METRICS in scripts/chart.py")
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        raise CheckError("dashboard panel ids are not unique")
    for p in dash["panels"]:
        if p["type"] != "row" and not p.get("targets"):
            raise CheckError(f"dashboard panel {p['title']!r} has no query")
    print(f"dashboard: {len(dash['panels'])} panels, metrics {sorted(used)}")


# ---------------------------------------------------------------- SseRoute examples vs the CRD

def structural_to_jsonschema(s, root=False):
    """A Kubernetes structural schema as JSON Schema, the way the API server applies it:
    `nullable` admits null, `x-kubernetes-int-or-string` admits both, objects reject unknown
    fields (kubectl's default `--validate=strict`) unless `x-kubernetes-preserve-unknown-fields`.
    CEL rules (`x-kubernetes-validations`) are not evaluated here (src/api.rs tests them)."""
    s = copy.deepcopy(s)
    out = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {n: structural_to_jsonschema(p) for n, p in v.items()}
        elif k == "items":
            out[k] = structural_to_jsonschema(v)
        elif k == "additionalProperties" and isinstance(v, dict):
            out[k] = structural_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [structural_to_jsonschema(x) for x in v]
        elif k == "not":
            out[k] = structural_to_jsonschema(v)
        elif k.startswith("x-kubernetes-") or k in ("nullable", "default", "format", "description", "example"):
            continue
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if root:
        out.setdefault("properties", {}).update(
            apiVersion={"type": "string"}, kind={"type": "string"},
            metadata={"type": "object", "required": ["name"],
                      "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}}})
    typ = out.get("type")
    if (typ == "object" or (isinstance(typ, list) and "object" in typ)) and "properties" in out \
            and "additionalProperties" not in out and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validators():
    out = {}
    for f in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = structural_to_jsonschema(v["schema"]["openAPIV3Schema"], root=True)
            jsonschema.Draft7Validator.check_schema(schema)
            out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def route_errors(validators, obj):
    v = validators.get((obj.get("apiVersion"), obj.get("kind")))
    if v is None:
        return [f"no CRD serves {obj.get('apiVersion')} {obj.get('kind')}"]
    meta = {k: obj["metadata"][k] for k in ("name",) if k in obj.get("metadata", {})}
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in v.iter_errors({**obj, "metadata": meta})]


def check_examples():
    validators = crd_validators()
    kinds = {k for (_, k) in validators}
    n = 0
    for f in sorted((REPO / "manifests").rglob("*.yaml")):
        for obj in docs(f.read_text()):
            if obj.get("kind") not in kinds:
                continue
            errs = route_errors(validators, obj)
            if errs:
                raise CheckError(f"{f.relative_to(REPO)}: {obj['kind']} {obj['metadata'].get('name')} "
                                 "does not match its CRD schema:\n  " + "\n  ".join(errs))
            n += 1
    if n == 0:
        raise CheckError("no SseRoute found in manifests/")
    # The validator itself must catch what the API server would reject.
    good = {"apiVersion": "ssegate.io/v1alpha1", "kind": "SseRoute", "metadata": {"name": "r"},
            "spec": {"rules": [{"match": {"path": "/a"}, "backend": {"service": "svc", "port": "http"}}]}}
    if route_errors(validators, good):
        raise CheckError(f"a minimal valid route is rejected: {route_errors(validators, good)}")
    bad = {
        "unknown field": lambda r: r["spec"]["rules"][0].update(bakend={}),
        "missing backend": lambda r: r["spec"]["rules"][0].pop("backend"),
        "port not int or string": lambda r: r["spec"]["rules"][0]["backend"].update(port=[80]),
        "bad duration": lambda r: r["spec"]["rules"][0].update(keepalive={"interval": "15 seconds"}),
        "bad enum": lambda r: r["spec"]["rules"][0]["match"].update(pathType="Regex"),
        "no rules": lambda r: r["spec"].update(rules=[]),
    }
    for what, mutate in bad.items():
        r = copy.deepcopy(good)
        mutate(r)
        if not route_errors(validators, r):
            raise CheckError(f"the CRD schema check accepts a route with {what}")
    print(f"SseRoutes in manifests/ valid against the CRD: {n} (and {len(bad)} broken ones rejected)")


# ---------------------------------------------------------------- main

def cmd_check(args):
    check_fresh()
    flags = binary_flags(args.ssegate)
    check_pending(flags)
    sets = [("default values", None)] + [(p.name, p) for p in ci_values()] + \
        [(str(INSTALL_VALUES.relative_to(REPO)), INSTALL_VALUES)]
    if len(sets) < 5:
        raise CheckError("expected charts/ssegate/ci/*-values.yaml for at least TLS, replicas, namespaced RBAC, ServiceMonitor")
    total = 0
    for label, path in sets:
        helm("lint", "--strict", str(CHART), *(["-f", str(path)] if path else []))
        values = yaml.safe_load(path.read_text()) if path else {}
        objs = docs(render(path, include_crds=True))
        total += kube_validate(objs, label)
        expect(label, values, [o for o in objs if o["kind"] != "CustomResourceDefinition"], flags)
        print(f"{label}: lint ok, {len(objs)} objects rendered, valid and as expected")
    print(f"kubernetes-validate --strict ({', '.join(K8S_VERSIONS)}): {total} objects valid "
          f"(skipped: {', '.join(k for _, k in sorted(FOREIGN_KINDS))}, no schema shipped; asserted above)")
    check_schema_rejects()
    check_dashboard()
    check_examples()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("generate", help="rewrite the generated files")
    c = sub.add_parser("check", help="lint, render, validate and compare")
    c.add_argument("--ssegate", required=True, help="the ssegate binary (its `run --help` lists the real flags)")
    args = p.parse_args()
    if not HELM.exists():
        sys.exit(f"{HELM} missing: scripts/test installs it (install_helm)")
    try:
        {"generate": cmd_generate, "check": cmd_check}[args.cmd](args)
    except CheckError as e:
        sys.exit(f"FAILED: {e}")


if __name__ == "__main__":
    main()
