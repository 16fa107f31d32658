#!/usr/bin/env bash
# Builds Collie and starts the demo: the gateway on 127.0.0.1:8080 (admin and
# metrics on 127.0.0.1:9090) in front of two local mock providers, with the
# embedded demo config. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
cargo build --release --locked
exec ./target/release/collie demo "$@"
