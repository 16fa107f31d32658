#!/usr/bin/env bash
# Makes sure the servers the tests talk to are up on this machine, installing
# and starting local ones from Debian's packages when they are missing:
#   PostgreSQL at 127.0.0.1:5432, database `test`, trust auth for user postgres
#     (the audit trail's PostgreSQL sink);
#   Redis at 127.0.0.1:6379 (fleet mode's shared quotas).
# Servers already running are used as they are. Safe to run again.
set -euo pipefail

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
apt_install() {
  echo "services: installing $*"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq || true
  $sudo_cmd apt-get install -y -qq --no-install-recommends "$@"
}
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then su postgres -c "$*"; else sudo -u postgres sh -c "$*"; fi
}
pg_works() {
  psql "postgres://postgres@127.0.0.1:5432/test" -qtAc 'select 1' >/dev/null 2>&1
}

# --- PostgreSQL ---------------------------------------------------------------
command -v psql >/dev/null 2>&1 || apt_install postgresql-client
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
  fi
  version="$(ls /etc/postgresql | sort -V | tail -1)"
  echo "services: starting PostgreSQL $version"
  $sudo_cmd pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "services: PostgreSQL does not answer at 127.0.0.1:5432" >&2
  exit 1
fi
if ! pg_works; then
  # A fresh Debian cluster: no `test` database, password auth over TCP.
  version="$(ls /etc/postgresql | sort -V | tail -1)"
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if [ -f "$hba" ] && ! grep -q "collie tests" "$hba"; then
    echo "services: trusting local TCP connections for user postgres (tests only)"
    $sudo_cmd sed -i '1i # collie tests: trust the local test user over loopback\nhost all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_postgres "psql -qc 'select pg_reload_conf()'" >/dev/null
  fi
  as_postgres "psql -qtAc \"select 1 from pg_database where datname = 'test'\"" | grep -q 1 \
    || as_postgres "createdb test"
fi
if ! pg_works; then
  echo "services: cannot connect to postgres://postgres@127.0.0.1:5432/test" >&2
  exit 1
fi

# --- Redis --------------------------------------------------------------------
redis_up() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]
  else
    # No client: speak the protocol by hand.
    exec 3<>/dev/tcp/127.0.0.1/6379 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    local reply
    read -r -t 2 reply <&3 || true
    exec 3>&-
    [ "${reply%$'\r'}" = "+PONG" ]
  fi
}
# The fleet tests also start Redis servers of their own (to stop and restart
# them): the server binary is needed even where one already answers.
command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools
if ! redis_up; then
  echo "services: starting Redis"
  mkdir -p /tmp/collie-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/collie-redis --logfile /tmp/collie-redis/redis.log
  for _ in $(seq 1 30); do redis_up && break; sleep 0.2; done
fi
if ! redis_up; then
  echo "services: Redis does not answer at 127.0.0.1:6379" >&2
  exit 1
fi
echo "services: PostgreSQL and Redis are up"
