#!/usr/bin/env bash
# Optional: probe the emulator with kube-rs 5.0.0 (builds e2e/apiserver/kubeprobe, a few minutes the first time).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WORK="$(mktemp -d -t kubeprobe.XXXXXX)"
SERVER_PID=""
trap '[[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/kubeprobe/target}"
cargo build -q --manifest-path "$HERE/kubeprobe/Cargo.toml"
"$ROOT/.venv/bin/python" "$HERE/server.py" --port 0 --kubeconfig-out "$WORK/kubeconfig" --ready-file "$WORK/ready" \
    --bookmark-interval 1 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do [[ -s "$WORK/ready" ]] && break; sleep 0.1; done
export KUBECONFIG="$WORK/kubeconfig" KUBECACHEDIR="$WORK/cache"
kubectl apply --validate=false -f "$HERE/testdata/crd-sseroutes.yaml" -f "$HERE/testdata/namespace.yaml" >/dev/null
kubectl apply --validate=false -f "$HERE/testdata/sseroute.yaml" >/dev/null
timeout 60 "$CARGO_TARGET_DIR/debug/kubeprobe"
