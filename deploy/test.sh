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

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== collie check-config conf/*.yaml"
cargo build --locked --quiet
# Shipped configs name provider keys by environment variable; any value will do for validation.
OPENAI_API_KEY=x AZURE_OPENAI_KEY=x DEEPSEEK_API_KEY=x COLLIE_DEMO_PROVIDER_KEY=x \
  ./target/debug/collie check-config conf/*.yaml
echo "== cargo nextest run"
cargo nextest run --locked --no-fail-fast "$@"
