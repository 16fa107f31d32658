#!/usr/bin/env bash
# Builds the Dockerfile's runtime stage with podman and runs it the way the
# Kubernetes manifests do: as uid 10001, read-only root, no capabilities, no
# new privileges, the config directory mounted read-only and only
# /var/lib/collie writable (a new named volume, which takes the image
# directory's owner). Checks the image's metadata, requests through it
# (plain and streamed) to a mock provider, the audit trail it writes, a
# SIGHUP reload of an edited config, and that `podman stop` (STOPSIGNAL
# SIGTERM) lets a stream in flight finish before the container exits 0.
#
# The build stage (FROM rust:…) needs an image registry, which this test does
# not use: it runs deploy/container/rootfs.sh, the script the build stage
# runs, on the given binary, and builds the runtime stage, taken verbatim from
# the Dockerfile, with that directory in place of the build stage's output.
#
# Usage: deploy/tests/image.sh target/release/collie
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:?usage: image.sh COLLIE_BINARY}")

tmp=$(mktemp -d /tmp/collie-image.XXXXXX)
tag="localhost/collie-test:$$"
name="collie-test-$$"
store=(--root "$tmp/storage" --runroot "$tmp/run" --storage-driver vfs)
podman=(podman "${store[@]}" --runtime runc --cgroup-manager cgroupfs)
pids=()
cleanup() {
  "${podman[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true
  "${podman[@]}" rmi -f "$tag" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # vfs layers hold root-owned copies of the image; podman's own cleanup.
  "${podman[@]}" system reset -f >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL image: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "image: assembling the runtime root filesystem with deploy/container/rootfs.sh"
deploy/container/rootfs.sh "$bin" "$tmp/ctx/rootfs"
# The runtime stage as written in the Dockerfile; only its COPY --from=build
# source changes to the directory just assembled.
awk '/^FROM scratch AS runtime/ { on = 1 } on' Dockerfile |
  sed 's|^COPY --from=build \(--chown=[0-9:]* \)\{0,1\}/rootfs/|COPY \1rootfs/|' > "$tmp/ctx/Containerfile"
grep -q '^COPY rootfs/ /$' "$tmp/ctx/Containerfile" || fail "the Dockerfile's runtime stage no longer copies /rootfs/ from the build stage"
if grep -q -- '--from' "$tmp/ctx/Containerfile"; then fail "the runtime stage copies from another stage too"; fi

echo "image: podman build (runtime stage)"
"${podman[@]}" build -q --format docker -t "$tag" -f "$tmp/ctx/Containerfile" "$tmp/ctx" >/dev/null
du -sh "$tmp/ctx/rootfs" | awk '{print "image: root filesystem " $1}'
inspect() { "${podman[@]}" image inspect --format "$1" "$tag"; }
[ "$(inspect '{{.Config.User}}')" = "10001:10001" ] || fail "image user is $(inspect '{{.Config.User}}')"
[ "$(inspect '{{.Config.StopSignal}}')" = "SIGTERM" ] || fail "stop signal is $(inspect '{{.Config.StopSignal}}')"
[ "$(inspect '{{json .Config.Entrypoint}}')" = '["/usr/local/bin/collie"]' ] || fail "entrypoint $(inspect '{{json .Config.Entrypoint}}')"
[ "$(inspect '{{json .Config.Cmd}}')" = '["run","--config","/etc/collie/collie.yaml"]' ] || fail "cmd $(inspect '{{json .Config.Cmd}}')"
[ "$(inspect '{{.Config.WorkingDir}}')" = "/var/lib/collie" ] || fail "working dir $(inspect '{{.Config.WorkingDir}}')"

# Two mock providers on the host; the container shares the host's network.
mock=$(free_port); gateway=$(free_port); admin=$(free_port)
"$bin" mock --listen "127.0.0.1:$mock" >"$tmp/mock.log" 2>&1 &
pids+=($!)
mkdir -p "$tmp/etc"
key_digest=$("$bin" hash-key sk-image-test)
write_config() { # $1: extra tenant id or empty; written whole, then renamed in
  local extra=""
  if [ -n "$1" ]; then
    extra="  - { id: $1, api_keys: [\"$("$bin" hash-key "sk-$1")\"], models: [\"*\"] }"
  fi
  cat >"$tmp/etc/collie.yaml.new" <<EOF
listen: 127.0.0.1:$gateway
admin_listen: 127.0.0.1:$admin
audit: { sink: sqlite, sqlite_path: audit.db }
tenants:
  - { id: team-a, api_keys: ["$key_digest"], models: ["*"] }
$extra
models:
  - { name: gpt-4o-mini, fallback: [mock] }
pools:
  - { id: mock, deployments: [{ deployment: mock-mini }] }
deployments:
  - { id: mock-mini, base_url: "http://127.0.0.1:$mock/v1", api_key_env: COLLIE_TEST_PROVIDER_KEY, model: gpt-4o-mini }
EOF
  chmod 0644 "$tmp/etc/collie.yaml.new"
  mv "$tmp/etc/collie.yaml.new" "$tmp/etc/collie.yaml"
}
write_config ""

echo "image: podman run --read-only --user 10001 --cap-drop ALL"
"${podman[@]}" run -d --name "$name" --network host \
  --read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges \
  --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
  -v "$tmp/etc:/etc/collie:ro" -v "$name:/var/lib/collie" \
  -e COLLIE_TEST_PROVIDER_KEY=x "$tag" >/dev/null
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null || { "${podman[@]}" logs "$name" >&2; fail "not ready"; }

pid=$("${podman[@]}" inspect --format '{{.State.Pid}}' "$name")
grep -q "^Uid:[[:space:]]*10001[[:space:]]" "/proc/$pid/status" || fail "not running as uid 10001: $(grep Uid "/proc/$pid/status")"
grep -q "^CapEff:[[:space:]]*0*$" "/proc/$pid/status" || fail "has capabilities: $(grep CapEff "/proc/$pid/status")"
grep -q "^NoNewPrivs:[[:space:]]*1" "/proc/$pid/status" || fail "no_new_privs is not set"
# (Output captured before grep: `grep -q` leaving early would fail the
# pipeline under pipefail.)
root_opts=$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo")
grep -q '^ro\b' <<<"$root_opts" || fail "root filesystem is writable"
echo "image: running as uid 10001, no capabilities, no_new_privs, read-only root"

chat() { # $1: tenant, $2: key, $3: extra JSON, rest: curl options
  local tenant=$1 key=$2 extra=$3
  shift 3
  curl -s "$@" "http://127.0.0.1:$gateway/v1/chat/completions" -H "X-Tenant-ID: $tenant" \
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d "{\"model\":\"gpt-4o-mini\"$extra,\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}"
}
[ "$(chat team-a sk-image-test '' -o /dev/null -w '%{http_code}')" = 200 ] || fail "chat request through the container failed"
streamed=$(chat team-a sk-image-test ',"stream":true')
grep -q '^data: \[DONE\]' <<<"$streamed" || fail "streamed request through the container failed"
metrics=$(curl -sf "http://127.0.0.1:$admin/metrics")
grep -q '^collie_requests_total{.*status_class="2xx",tenant="team-a"} 2$' <<<"$metrics" ||
  fail "metrics do not count the two requests"
# /var/lib/collie is a new named volume, as in the Dockerfile's `docker run`
# line: it takes the image directory's owner, so Collie can write there.
data=$("${podman[@]}" volume inspect --format '{{.Mountpoint}}' "$name")
for _ in $(seq 1 50); do [ -s "$data/audit.db" ] && break; sleep 0.1; done
[ "$(stat -c %u "$data/audit.db" 2>/dev/null)" = 10001 ] || fail "no audit trail written as 10001 in /var/lib/collie"
echo "image: requests served (plain and streamed), audit trail written under /var/lib/collie"

# SIGHUP: an edited config (a new tenant) is loaded without a restart.
write_config team-b
"${podman[@]}" kill --signal HUP "$name" >/dev/null
for _ in $(seq 1 50); do
  [ "$(chat team-b sk-team-b '' -o /dev/null -w '%{http_code}')" = 200 ] && break
  sleep 0.1
done
[ "$(chat team-b sk-team-b '' -o /dev/null -w '%{http_code}')" = 200 ] || fail "SIGHUP did not load the edited config"
"${podman[@]}" logs "$name" >"$tmp/collie.log" 2>&1
grep -q "reloaded /etc/collie/collie.yaml" "$tmp/collie.log" || fail "no reload in the log"
echo "image: SIGHUP reloaded the edited config"

# podman stop sends the image's STOPSIGNAL; a stream in flight (20 events,
# 100 ms apart) finishes before the process exits.
chat team-a sk-image-test ',"stream":true' -H 'x-mock-chunks: 20' -H 'x-mock-interval-ms: 100' >"$tmp/stream.out" &
stream=$!
sleep 0.5
start=$(date +%s)
"${podman[@]}" stop -t 45 "$name" >/dev/null
took=$(($(date +%s) - start))
wait "$stream" || fail "the stream in flight was cut off"
grep -q '^data: \[DONE\]' "$tmp/stream.out" || fail "the stream in flight did not finish: $(tail -c 300 "$tmp/stream.out")"
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
"${podman[@]}" logs "$name" >"$tmp/collie.log" 2>&1
grep -qE "graceful stop: waiting .*1 requests in flight" "$tmp/collie.log" || fail "no graceful drain in the log: $(tail -5 "$tmp/collie.log")"
[ "$took" -lt 30 ] || fail "stop took ${took}s"
echo "image: SIGTERM drained the stream in flight, exit code 0 after ${took}s"
echo "image: ok"
