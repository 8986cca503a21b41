#!/usr/bin/env bash
# Self-test of the Kubernetes API server emulator with the REAL kubectl (and curl for raw API calls).
#
#   bash e2e/apiserver/selftest.sh        # from anywhere; needs kubectl, curl and the venv:
#   python3 -m venv .venv && .venv/bin/pip install -r e2e/requirements.txt
#
# Exits non-zero on the first failure; prints "N passed, 0 failed" at the end.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DATA="$HERE/testdata"
WORK="$(mktemp -d -t kubeemu-selftest.XXXXXX)"
SERVER_PID=""
WATCH_PID=""
PASSED=0

cleanup() {
    [[ -n "$WATCH_PID" ]] && kill "$WATCH_PID" 2>/dev/null || true
    [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    echo "--- server log (tail):" >&2
    tail -n 30 "$WORK/server.log" >&2 || true
    echo "$PASSED passed, 1 failed"
    exit 1
}
ok() { PASSED=$((PASSED + 1)); echo "ok $PASSED - $*"; }
expect_eq() { [[ "$1" == "$2" ]] || fail "$3: expected '$2', got '$1'"; ok "$3"; }
expect_contains() { grep -qE -- "$2" <<<"$1" || fail "$3: no /$2/ in: $1"; ok "$3"; }
# Extract a field from JSON on stdin with a Python expression over `d`.
jq_py() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# --- start the emulator ----------------------------------------------------------------------
[[ -x "$PY" ]] || fail "no python venv at $PY (see the header of this script)"
"$PY" "$HERE/server.py" --port 0 --kubeconfig-out "$WORK/kubeconfig" --ready-file "$WORK/ready" \
      --watch-history 20 --bookmark-interval 0.5 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do [[ -s "$WORK/ready" ]] && break; sleep 0.1; done
[[ -s "$WORK/ready" ]] || fail "the emulator did not become ready"
URL="$(cat "$WORK/ready")"
export KUBECONFIG="$WORK/kubeconfig"
export KUBECACHEDIR="$WORK/kube-cache"  # fresh discovery cache: never reuse another run's
export HOME="$WORK"                      # and no ~/.kube of the user
K() { kubectl --request-timeout=10s "$@"; }
ok "emulator listening at $URL"

# --- discovery & CRDs ------------------------------------------------------------------------
expect_eq "$(curl -sf "$URL/api/v1" | jq_py 'd["groupVersion"]')" "v1" "core group version is v1"
expect_contains "$(K get svc 2>&1)" "No resources found" "kubectl get svc (empty)"
K apply --validate=false -f "$DATA/crd-sseroutes.yaml" >/dev/null || fail "apply CRD"
K wait --for condition=established --timeout=10s crd/sseroutes.ssegate.io >/dev/null || fail "CRD not Established"
ok "CRD applied and Established"
expect_contains "$(K api-resources --api-group=ssegate.io 2>&1)" "sseroutes +ssr +ssegate.io/v1alpha1 +true +SseRoute" \
    "discovery lists sseroutes (short name, namespaced)"

# --- custom resources --------------------------------------------------------------------------
K apply --validate=false -f "$DATA/namespace.yaml" -f "$DATA/sseroute.yaml" >/dev/null || fail "apply SseRoute"
OUT="$(K get ssr -A)"
expect_contains "$OUT" "NAMESPACE +NAME +HOST +PATH +BACKEND +READY +AGE" "kubectl get ssr -A: printer columns"
expect_contains "$OUT" "demo +ticker +ticker.example.test +/events +ticker" "kubectl get ssr -A: row"
expect_contains "$(K get sseroutes -n demo -o yaml)" "uid: " "kubectl get sseroutes -o yaml has a uid"
OBJ="$(K get ssr ticker -n demo -o json)"
expect_eq "$(jq_py 'd["metadata"]["generation"], d["metadata"]["namespace"], bool(d["metadata"]["creationTimestamp"].endswith("Z"))' <<<"$OBJ")" \
    "1 demo True" "generation=1, namespace from the URL, RFC3339 creationTimestamp"
expect_contains "$(K get ssr -n default 2>&1)" "No resources found" "namespaced listing"

# --- services & endpointslices -----------------------------------------------------------------
K apply --validate=false -f "$DATA/backend.yaml" >/dev/null || fail "apply Service + EndpointSlices"
expect_contains "$(K get svc -n demo)" "ticker" "kubectl get svc"
expect_eq "$(K get endpointslices -n demo -l kubernetes.io/service-name=ticker -o name | tr '\n' ' ')" \
    "endpointslice.discovery.k8s.io/ticker-abc12 " "label selector on endpointslices"
expect_eq "$(K get endpointslices -n demo -l 'kubernetes.io/service-name in (ticker,other),!nope' -o name | wc -l)" \
    "2" "set-based label selector"
expect_eq "$(K get endpointslices -A --field-selector metadata.name=other-xyz98 -o name)" \
    "endpointslice.discovery.k8s.io/other-xyz98" "field selector metadata.name"
LIST="$(curl -sf "$URL/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices")"
expect_eq "$(jq_py 'd["kind"], d["apiVersion"], d["metadata"]["resourceVersion"].isdigit()' <<<"$LIST")" \
    "EndpointSliceList discovery.k8s.io/v1 True" "lists have kind, apiVersion, resourceVersion"

# --- a watch in the background (kubectl get -w) --------------------------------------------------
K get ssr -n demo -w --output-watch-events \
    -o jsonpath='{.type} {.object.metadata.name} {.object.metadata.resourceVersion}{"\n"}' \
    >"$WORK/watch.out" 2>&1 &
WATCH_PID=$!
for _ in $(seq 1 50); do grep -q ADDED "$WORK/watch.out" 2>/dev/null && break; sleep 0.1; done
expect_contains "$(cat "$WORK/watch.out")" "^ADDED ticker" "kubectl get -w: initial ADDED"

# --- status subresource ----------------------------------------------------------------------------
RV0="$(K get ssr ticker -n demo -o jsonpath='{.metadata.resourceVersion}')"
K patch ssr ticker -n demo --subresource=status --type=merge \
    -p '{"status":{"observedGeneration":1,"conditions":[{"type":"Ready","status":"True"}]},"spec":{"host":"evil.test"}}' \
    >/dev/null || fail "kubectl patch --subresource=status"
OBJ="$(K get ssr ticker -n demo -o json)"
expect_eq "$(jq_py 'd["status"]["conditions"][0]["status"], d["spec"]["host"], d["metadata"]["generation"]' <<<"$OBJ")" \
    "True ticker.example.test 1" "status patch: status set, spec untouched, generation unchanged"
RV1="$(jq_py 'd["metadata"]["resourceVersion"]' <<<"$OBJ")"
[[ "$RV1" -gt "$RV0" ]] || fail "status patch did not bump resourceVersion ($RV0 -> $RV1)"
ok "status patch bumped resourceVersion ($RV0 -> $RV1)"
expect_contains "$(K get ssr -n demo ticker)" "ticker +ticker.example.test +/events +ticker +True" "Ready column from status"
K patch ssr ticker -n demo --type=merge -p '{"status":{"observedGeneration":99}}' >/dev/null
expect_eq "$(K get ssr ticker -n demo -o jsonpath='{.status.observedGeneration}')" "1" "main resource ignores .status"

# --- spec changes bump generation; no-op applies change nothing -----------------------------------------
K apply --validate=false -f "$DATA/sseroute-changed.yaml" >/dev/null || fail "re-apply changed SseRoute"
OBJ="$(K get ssr ticker -n demo -o json)"
expect_eq "$(jq_py 'd["metadata"]["generation"], d["spec"]["heartbeatSeconds"], d["status"]["observedGeneration"]' <<<"$OBJ")" \
    "2 30 1" "spec change: generation bumped, status kept"
RV2="$(jq_py 'd["metadata"]["resourceVersion"]' <<<"$OBJ")"
expect_contains "$(K apply --validate=false -f "$DATA/sseroute-changed.yaml")" "unchanged" "kubectl apply unchanged"
expect_eq "$(K get ssr ticker -n demo -o jsonpath='{.metadata.resourceVersion}')" "$RV2" "no-op keeps resourceVersion"

# --- server-side apply of the status ----------------------------------------------------------------
R="$URL/apis/ssegate.io/v1alpha1/namespaces/demo/sseroutes"
ssa_status() {
    curl -sf -X PATCH -H 'Content-Type: application/apply-patch+yaml' \
        "$R/ticker/status?fieldManager=ssegate&force=true" --data-binary @-
}
OBJ="$(ssa_status <<'EOF'
apiVersion: ssegate.io/v1alpha1
kind: SseRoute
metadata: {name: ticker, namespace: demo}
spec: {host: ignored.test}
status:
  observedGeneration: 2
  activeStreams: 3
  conditions: [{type: Ready, status: "True", reason: Serving}]
EOF
)" || fail "server-side apply of status"
expect_eq "$(jq_py 'd["status"]["observedGeneration"], d["status"]["activeStreams"], d["spec"]["host"], d["metadata"]["generation"]' <<<"$OBJ")" \
    "2 3 ticker.example.test 2" "SSA status: status applied, spec untouched, generation unchanged"
RV3="$(jq_py 'd["metadata"]["resourceVersion"]' <<<"$OBJ")"
OBJ="$(ssa_status <<<'{"apiVersion":"ssegate.io/v1alpha1","kind":"SseRoute","metadata":{"name":"ticker"},"status":{"observedGeneration":2,"activeStreams":3,"conditions":[{"type":"Ready","status":"True","reason":"Serving"}]}}')"
expect_eq "$(jq_py 'd["metadata"]["resourceVersion"]' <<<"$OBJ")" "$RV3" "identical SSA (JSON body) is a no-op"
OBJ="$(ssa_status <<<'{"apiVersion":"ssegate.io/v1alpha1","kind":"SseRoute","metadata":{"name":"ticker"},"status":{"observedGeneration":2,"conditions":[{"type":"Ready","status":"False","reason":"NoBackend"}]}}')"
expect_eq "$(jq_py '"activeStreams" in d["status"], d["status"]["conditions"][0]["status"]' <<<"$OBJ")" \
    "False False" "SSA removes the fields the manager stopped applying"
CODE="$(curl -s -o /dev/null -w '%{http_code}' -X PATCH -H 'Content-Type: application/apply-patch+yaml' \
    "$R/missing/status?fieldManager=ssegate&force=true" -d '{"apiVersion":"ssegate.io/v1alpha1","kind":"SseRoute","status":{}}')"
expect_eq "$CODE" "404" "SSA on the status of a missing object is 404"
CODE="$(curl -s -o "$WORK/created.json" -w '%{http_code}' -X PATCH -H 'Content-Type: application/apply-patch+yaml' \
    "$R/applied?fieldManager=ssegate" -d '{"apiVersion":"ssegate.io/v1alpha1","kind":"SseRoute","metadata":{"name":"applied"},"spec":{"host":"a.test","backend":{"serviceName":"a","port":80}}}')"
expect_eq "$CODE $(jq_py 'd["metadata"]["generation"]' <"$WORK/created.json")" "201 1" "SSA creates a missing object"

# --- watch resumed from a list's resourceVersion ---------------------------------------------------------
LIST_RV="$(curl -sf "$R" | jq_py 'd["metadata"]["resourceVersion"]')"
K label ssr applied -n demo tier=gold >/dev/null
EVENTS="$(curl -sf "$R?watch=true&resourceVersion=$LIST_RV&timeoutSeconds=1")"
expect_eq "$(jq_py '[d["type"], d["object"]["metadata"]["name"], d["object"]["metadata"]["labels"]["tier"]]' <<<"$EVENTS" | tr -d "[]',")" \
    "MODIFIED applied gold" "watch from a list resourceVersion only sends newer events"
curl -sf -D "$WORK/headers" -o /dev/null "$R?watch=true&timeoutSeconds=1" || fail "watch request"
expect_contains "$(cat "$WORK/headers")" "Content-Type: application/json" "watch content type is application/json"
EVENTS="$(curl -sf "$R?watch=true&timeoutSeconds=1&labelSelector=tier%3Dgold")"
expect_eq "$(wc -l <<<"$EVENTS" | tr -d ' ')" "1" "watch without resourceVersion replays the (selected) state as ADDED"

EVENTS="$(curl -sf "$R?watch=true&resourceVersion=$LIST_RV&allowWatchBookmarks=true&timeoutSeconds=1.5")"
expect_contains "$(jq_py 'd["type"], d["object"]["kind"], d["object"]["metadata"]["resourceVersion"].isdigit()' <<<"$(tail -n1 <<<"$EVENTS")")" \
    "^BOOKMARK SseRoute True$" "allowWatchBookmarks: periodic BOOKMARK events"
EVENTS="$(curl -sf "$R?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=0.3")"
expect_eq "$(jq_py 'd["type"], d["object"]["metadata"].get("annotations", {}).get("k8s.io/initial-events-end")' <<<"$(tail -n1 <<<"$EVENTS")")" \
    "BOOKMARK true" "streaming list: initial ADDED events, then the initial-events-end BOOKMARK"

# --- leases: create, PUT with optimistic concurrency, 409 on a stale write, 410 on a too old watch ------------
L="$URL/apis/coordination.k8s.io/v1/namespaces/demo/leases"
LEASE="$(curl -sf -X POST -H 'Content-Type: application/json' "$L" -d '{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"ssegate-leader"},"spec":{"holderIdentity":"pod-a","leaseDurationSeconds":15,"acquireTime":"2026-11-23T10:00:00.000000Z","renewTime":"2026-11-23T10:00:00.000000Z","leaseTransitions":0}}')" \
    || fail "create lease"
ok "lease created"
STALE="$LEASE"
RENEWED="$(jq_py 'json.dumps({**d, "spec": {**d["spec"], "renewTime": "2026-11-23T10:00:05.000000Z"}})' <<<"$LEASE")"
CODE="$(curl -s -o "$WORK/lease.json" -w '%{http_code}' -X PUT -H 'Content-Type: application/json' "$L/ssegate-leader" -d "$RENEWED")"
expect_eq "$CODE $(jq_py 'd["spec"]["renewTime"]' <"$WORK/lease.json")" "200 2026-11-23T10:00:05.000000Z" "lease PUT with the current resourceVersion"
CODE="$(curl -s -o "$WORK/conflict.json" -w '%{http_code}' -X PUT -H 'Content-Type: application/json' "$L/ssegate-leader" -d "$STALE")"
expect_eq "$CODE $(jq_py 'd["kind"], d["reason"], d["code"]' <"$WORK/conflict.json")" "409 Status Conflict 409" "stale lease PUT is a 409 Conflict Status"
CODE="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' "$L" -d "$STALE")"
expect_eq "$CODE" "400" "creating with a resourceVersion is a 400 (as in the apiserver)"
FRESH="$(jq_py 'json.dumps({**d, "metadata": {"name": d["metadata"]["name"]}})' <<<"$STALE")"
CODE="$(curl -s -o "$WORK/exists.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' "$L" -d "$FRESH")"
expect_eq "$CODE $(jq_py 'd["reason"]' <"$WORK/exists.json")" "409 AlreadyExists" "creating an existing lease is a 409 AlreadyExists"
FIRST_RV="$(jq_py 'd["metadata"]["resourceVersion"]' <<<"$LEASE")"
for i in $(seq 1 25); do
    curl -sf -X PATCH -H 'Content-Type: application/merge-patch+json' "$L/ssegate-leader" \
        -d "{\"spec\":{\"leaseTransitions\":$i}}" >/dev/null || fail "lease merge patch $i"
done
EVENTS="$(curl -sf "$L?watch=true&resourceVersion=$FIRST_RV&timeoutSeconds=1")"
expect_eq "$(jq_py 'd["type"], d["object"]["code"]' <<<"$EVENTS")" "ERROR 410" "watch from a too old resourceVersion gets 410 Gone"

# --- typical install manifests (client-side apply, strategic merge patches, delete -f) ---------------------
K apply --validate=false -f "$DATA/deploy-bundle.yaml" >/dev/null || fail "apply the deploy bundle"
sed 's/value: info/value: debug/; s/averageUtilization: 80/averageUtilization: 70/' "$DATA/deploy-bundle.yaml" >"$WORK/bundle2.yaml"
K apply --validate=false -f "$WORK/bundle2.yaml" >/dev/null || fail "re-apply the changed deploy bundle"
DEPLOY="$(K get deploy ssegate -n demo -o json)"
expect_eq "$(jq_py 'd["metadata"]["generation"], [e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]], len(d["spec"]["template"]["spec"]["containers"][0]["ports"])' <<<"$DEPLOY" | tr -d "[]',")" \
    "2 debug None 2" "strategic merge keeps list items (env by name, ports)"
expect_eq "$(K get hpa ssegate -n demo -o jsonpath='{.apiVersion} {.spec.metrics[0].resource.target.averageUtilization}')" \
    "autoscaling/v2 70" "HPA autoscaling/v2 updated"
K delete -f "$DATA/deploy-bundle.yaml" >/dev/null || fail "kubectl delete -f the bundle"
expect_contains "$(K get deploy,cm,sa,pdb,hpa,role,rolebinding -n demo 2>&1)" "No resources found" "bundle deleted"

# --- finalizers and deletion ------------------------------------------------------------------------------
K patch ssr applied -n demo --type=merge -p '{"metadata":{"finalizers":["ssegate.io/cleanup"]}}' >/dev/null
K delete ssr applied -n demo --wait=false >/dev/null
expect_contains "$(K get ssr applied -n demo -o jsonpath='{.metadata.deletionTimestamp}')" "Z$" "delete with a finalizer sets deletionTimestamp"
K patch ssr applied -n demo --type=json -p '[{"op":"remove","path":"/metadata/finalizers"}]' >/dev/null
expect_contains "$(K get ssr applied -n demo 2>&1 || true)" "NotFound" "removing the last finalizer deletes (JSON patch)"
K delete -f "$DATA/sseroute.yaml" >/dev/null || fail "kubectl delete -f sseroute"
expect_contains "$(K get ssr ticker -n demo 2>&1 || true)" 'sseroutes.ssegate.io "ticker" not found' "deleted object is NotFound"

# --- what the background watch saw ---------------------------------------------------------------------------
for _ in $(seq 1 50); do grep -q "^DELETED ticker" "$WORK/watch.out" && break; sleep 0.1; done
WATCHED="$(cat "$WORK/watch.out")"
expect_contains "$WATCHED" "^MODIFIED ticker $RV1$" "kubectl get -w saw the status change"
expect_contains "$WATCHED" "^MODIFIED ticker $RV2$" "kubectl get -w saw the spec change"
expect_contains "$WATCHED" "^DELETED ticker" "kubectl get -w saw the deletion"
kill "$WATCH_PID" 2>/dev/null || true
WATCH_PID=""

# --- CRD deletion removes the resource ------------------------------------------------------------------------
K delete crd sseroutes.ssegate.io >/dev/null || fail "delete CRD"
CODE="$(curl -s -o /dev/null -w '%{http_code}' "$R")"
expect_eq "$CODE" "404" "CRD deleted: its resource is gone from the API"

# --- clean shutdown on SIGTERM ---------------------------------------------------------------------------------
curl -sN "$URL/api/v1/namespaces?watch=true" >/dev/null &
sleep 0.3
kill -TERM "$SERVER_PID"
for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then fail "the emulator did not exit within 5s of SIGTERM"; fi
wait "$SERVER_PID" && STATUS=0 || STATUS=$?
SERVER_PID=""
expect_eq "$STATUS" "0" "SIGTERM: clean exit with an open watch"
wait || true

echo "$PASSED passed, 0 failed"
