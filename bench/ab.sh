#!/usr/bin/env bash
# Two Collie binaries on the same requests, interleaved: req/s and CPU µs per
# request of each, round by round (layout L1: the proxy on CPU0 with one
# worker thread, the mock and wrk on CPU1; audit off). For a change's own
# figure: build the binary before and after it, then
#   bench/ab.sh before ./collie-before after ./target/release/collie [rounds] [scenario]
# scenario: small (default), large (200 KiB body) or stream.
set -euo pipefail
L1=$1 B1=$2 L2=$3 B2=$4 N=${5:-5} SCEN=${6:-small}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
TMP=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$TMP"' EXIT
python3 -c "
import sys; sys.path.insert(0, '$ROOT/bench')
import run
run.collie_config('$TMP/collie.yaml', 0)
body = {'small': run.chat_body(300), 'large': run.chat_body(200 * 1024), 'stream': run.stream_body()}['$SCEN']
run.lua_script('$TMP/req.lua', body, {'X-Tenant-ID': 'bench', 'Authorization': 'Bearer ' + run.BENCH_KEY})
print(run.COLLIE_PORT, run.MOCK_PORT)
" > "$TMP/ports"
read -r PORT MOCK < "$TMP/ports"
taskset -c 1 "$REL/collie" mock --listen "127.0.0.1:$MOCK" > "$TMP/mock.log" 2>&1 &
sleep 0.5
URL=http://127.0.0.1:$PORT/v1/chat/completions
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for r in $(seq "$N"); do
  for arm in 1 2; do
    if [ "$arm" = 1 ]; then L=$L1 B=$B1; else L=$L2 B=$B2; fi
    taskset -c 0 "$B" run --config "$TMP/collie.yaml" > "$TMP/$L.log" 2>&1 &
    P=$!
    for _ in $(seq 50); do curl -s -o /dev/null "$URL" && break; sleep 0.1; done
    taskset -c 1 wrk -t1 -c64 -d2s -s "$TMP/req.lua" "$URL" > /dev/null
    T0=$(ticks $P)
    OUT=$(taskset -c 1 wrk -t1 -c64 -d5s -s "$TMP/req.lua" "$URL")
    T1=$(ticks $P)
    read -r REQS ERRS STATUS _ _ <<< "$(echo "$OUT" | awk '/^RESULT/{print $2, $3, $4, $5, $6}')"
    HZ=$(getconf CLK_TCK)
    python3 -c "print(f'$L round $r: {$REQS/5:.0f} req/s, {($T1-$T0)/$HZ*1e6/$REQS:.1f} µs CPU/request, errors {$ERRS + $STATUS}')"
    kill $P; wait $P 2>/dev/null || true
  done
done
