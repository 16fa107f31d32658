#!/usr/bin/env bash
# Checks deploy/systemd/collie.service: `systemd-analyze verify` finds
# nothing to say about it (it exits 0 on unknown keys and bad values, so any
# output fails), its sandbox scores no worse than 2.0 on `systemd-analyze
# security --offline`, and the exit code the unit relies on is real: `collie
# run` on an invalid config exits 64 (RestartPreventExitStatus), as does the
# check-config that guards start and reload.
# Usage: deploy/tests/systemd.sh target/release/collie
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:?usage: systemd.sh COLLIE_BINARY}")
unit=deploy/systemd/collie.service
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL systemd: $*" >&2; exit 1; }

# verify wants the programs the unit runs to exist: point it at this build.
sed "s|/usr/local/bin/collie|$bin|g" "$unit" >"$tmp/collie.service"
out=$(systemd-analyze verify "$tmp/collie.service" 2>&1) || fail "systemd-analyze verify failed: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
echo "systemd: systemd-analyze verify: clean"

level=$(systemd-analyze security --offline=yes "$tmp/collie.service" 2>&1 |
  sed -n 's/.*Overall exposure level for collie.service: \([0-9.]*\).*/\1/p')
[ -n "$level" ] || fail "systemd-analyze security printed no exposure level"
awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }' || fail "exposure level $level is above 2.0"
echo "systemd: systemd-analyze security --offline: exposure $level"

grep -q '^RestartPreventExitStatus=64$' "$unit" || fail "RestartPreventExitStatus=64 is gone"
printf 'listen: [not an address\n' >"$tmp/bad.yaml"
set +e
"$bin" run --config "$tmp/bad.yaml" >/dev/null 2>&1
run_code=$?
"$bin" check-config "$tmp/bad.yaml" >/dev/null 2>&1
check_code=$?
set -e
[ "$run_code" = 64 ] || fail "collie run on an invalid config exited $run_code, not 64"
[ "$check_code" = 64 ] || fail "collie check-config on an invalid config exited $check_code, not 64"
echo "systemd: an invalid config exits 64 (run and check-config)"
