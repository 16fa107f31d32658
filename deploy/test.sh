#!/usr/bin/env bash
# Runs every check Collie has: formatting, lints, the shipped configs, and the
# whole test suite. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test: installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== collie check-config conf/*.yaml"
cargo build --locked --quiet
# Shipped configs name provider keys by environment variable; any value will do for validation.
OPENAI_API_KEY=x AZURE_OPENAI_KEY=x DEEPSEEK_API_KEY=x COLLIE_DEMO_PROVIDER_KEY=x \
  ./target/debug/collie check-config conf/*.yaml
echo "== cargo nextest run"
cargo nextest run --locked --no-fail-fast "$@"
