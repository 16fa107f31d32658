#!/usr/bin/env bash
# The deployment kit's checks, run by deploy/test.sh: the release binary is
# stripped, the Dockerfile lints clean, the Kubernetes manifests validate,
# the systemd unit verifies, a real Prometheus scrapes a real Collie with the
# shipped configs (rules, rule tests, dashboard queries), and the image's
# runtime stage builds and runs under podman. Needs what deploy/setup.sh
# --test installs and the Python tools deploy/test.sh puts in
# target/deploy-venv.
# Usage: deploy/tests/check.sh target/release/collie
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:?usage: check.sh COLLIE_RELEASE_BINARY}
venv=${DEPLOY_VENV:-target/deploy-venv}

echo "-- release binary: stripped"
size=$(stat -c %s "$bin")
sections=$(readelf -S "$bin")
if grep -qE '\.(symtab|debug_)' <<<"$sections"; then
  echo "FAIL $bin carries symbols or debug info" >&2
  exit 1
fi
echo "$bin: $((size / 1024 / 1024)) MiB, no symbol table, no debug info"

echo "-- shell scripts: bash -n"
for f in deploy/*.sh deploy/*/*.sh .ci/run; do bash -n "$f"; done

echo "-- Dockerfile: hadolint"
"$venv/bin/hadolint" Dockerfile
echo "Dockerfile: clean"

echo "-- Kubernetes manifests"
"$venv/bin/python" deploy/tests/kubernetes.py --collie "$bin"

echo "-- systemd unit"
deploy/tests/systemd.sh "$bin"

echo "-- Prometheus: config, rules, metrics, a real scrape, the dashboard's queries"
"$venv/bin/python" deploy/tests/prometheus.py --collie "$bin"

echo "-- container image: runtime stage under podman"
deploy/tests/image.sh "$bin"
