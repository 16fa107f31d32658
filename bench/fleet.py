#!/usr/bin/env python3
"""Fleet mode's cost: the same requests through Collie with fleet mode off
and on, one sidecar and three, interleaved and repeated in one run.

Arms (all Collie, full policy, audit off so the fleet's own cost shows):
  - off-1: one sidecar, no `fleet` section;
  - on-1:  one sidecar sharing its quotas through Redis;
  - off-3: three sidecars, each with its own ledger (each admits the whole
           limit: what fleet mode fixes);
  - on-3:  three sidecars sharing through one Redis.
For the three-sidecar arms, three wrk processes (one per sidecar) run at once
and their req/s are added.

Measures per arm: req/s (wrk, closed loop), Collie CPU µs per request (sum over
its processes of Δ utime+stime ÷ requests), and for the fleet arms the Redis
commands per 1,000 requests (a Redis of the benchmark's own, its
`total_commands_processed`, so nothing else counts).

Layout: nothing pinned (three sidecars and a Redis on two cores), one worker
thread per sidecar. Tenants have limits far above the load, so nothing is
refused and the leases are what is measured.

Usage: bench/fleet.py [--rounds 5] [--duration 10] [--quick]
Needs: cargo build --release -p collie, wrk, redis-server.
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
MOCK_PORT, REDIS_PORT = 9301, 6391
BENCH_KEY = "sk-bench"
KEY_DIGEST = "c00397de4384b5bbaf14c02fe1ec7020d28d1eeab6a722c576c84b6678c41c29"


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def redis_commands():
    out = subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "info", "stats"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    return 0


def config(path, port, admin, fleet):
    lines = [
        f"listen: 127.0.0.1:{port}",
        f"admin_listen: 127.0.0.1:{admin}",
        "threads: 1",
        "audit: {sink: off}",
        "quota:",
        "  rebalance: {enabled: false}",
        "  defaults: {rpm: 100000000, tpm: 100000000000, requests_per_day: 1000000000, usd_per_day: 1000000.0}",
        "tenants:",
        f"  - {{id: bench, api_keys: [\"{KEY_DIGEST}\"], models: [\"*\"], priority: 1}}",
        "models:",
        "  - {name: bench, fallback: [p]}",
        "pools:",
        "  - id: p",
        "    deployments: [{deployment: d1}]",
        "deployments:",
        f"  - {{id: d1, base_url: \"http://127.0.0.1:{MOCK_PORT}/v1\", model: bench-upstream, rpm: 100000000}}",
        "pricing:",
        "  bench-upstream: {input_per_mtok: 1.0, output_per_mtok: 2.0}",
    ]
    if fleet:
        lines += [
            "fleet:",
            f"  redis_url: redis://127.0.0.1:{REDIS_PORT}/0",
            "  namespace: bench",
            "  on_redis_down: local",
            "  expected_replicas: 3",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def lua(path):
    body = '{"messages":[{"role":"user","content":"' + "x" * 200 + '"}],"max_tokens":16,"model":"bench"}'
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f"wrk.body = '{body}'\n")
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        f.write('wrk.headers["X-Tenant-ID"] = "bench"\n')
        f.write(f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n')


def wrk_start(port, script, duration, conns):
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", script, f"http://127.0.0.1:{port}/v1/chat/completions"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_result(p):
    out = p.communicate()[0]
    reqs = errors = 0
    rps = 0.0
    for line in out.splitlines():
        line = line.strip()
        if "requests in" in line:
            reqs = int(line.split()[0])
        elif line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        elif line.startswith("Non-2xx or 3xx responses:"):
            errors += int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            errors += sum(int(x.split()[-1]) for x in line.split(":", 1)[1].split(","))
    return reqs, rps, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 3
    for tool in ("wrk", "redis-server", "redis-cli"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}")
    tmp = tempfile.mkdtemp(prefix="collie-fleet-bench-")
    procs = []

    def start(cmd, port, env=None):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        procs.append(p)
        wait_port(port)
        return p

    results = {}
    try:
        start(["redis-server", "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"], REDIS_PORT)
        start([f"{REL}/collie", "mock", "--listen", f"127.0.0.1:{MOCK_PORT}"], MOCK_PORT)
        env = {**os.environ, "RUST_LOG": "warn"}
        arms = {}
        port = 8301
        for arm, fleet, n in (("off-1", False, 1), ("on-1", True, 1), ("off-3", False, 3), ("on-3", True, 3)):
            members = []
            for i in range(n):
                conf = os.path.join(tmp, f"{arm}-{i}.yaml")
                config(conf, port, port + 1000, fleet)
                p = start([f"{REL}/collie", "run", "--config", conf], port, env=env)
                members.append((port, p.pid))
                port += 1
            arms[arm] = members
        script = os.path.join(tmp, "chat.lua")
        lua(script)
        clk = os.sysconf("SC_CLK_TCK")
        # Warm up every sidecar (leases, connections).
        for members in arms.values():
            for port, _ in members:
                wrk_result(wrk_start(port, script, 1, 8))
        for rnd in range(args.rounds):
            for arm, members in arms.items():
                conns = 64 // len(members)
                t0 = sum(cpu_ticks(pid) for _, pid in members)
                c0 = redis_commands()
                runs = [wrk_start(port, script, args.duration, conns) for port, _ in members]
                outs = [wrk_result(r) for r in runs]
                c1 = redis_commands()
                reqs = sum(o[0] for o in outs)
                rps = sum(o[1] for o in outs)
                errors = sum(o[2] for o in outs)
                cpu_us = (sum(cpu_ticks(pid) for _, pid in members) - t0) / clk * 1e6 / max(reqs, 1)
                redis_per_k = (c1 - c0) * 1000 / max(reqs, 1) if arm.startswith("on") else None
                results.setdefault(arm, []).append({"rps": rps, "cpu_us": cpu_us, "errors": errors, "redis_per_k": redis_per_k})
                print(f"{arm:6} round {rnd}: {rps:9.0f} req/s  cpu {cpu_us:6.1f} µs/req  errors {errors}"
                      + (f"  redis {redis_per_k:.2f} commands/1,000 requests" if redis_per_k is not None else ""), flush=True)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(arm, key):
        vals = [r[key] for r in results.get(arm, []) if r[key] is not None]
        return statistics.median(vals) if vals else None

    print("\nmedians (spread = min..max over rounds)")
    for arm, rs in results.items():
        line = (f"{arm:6} {med(arm, 'rps'):9.0f} req/s ({min(r['rps'] for r in rs):.0f}..{max(r['rps'] for r in rs):.0f})"
                f"  cpu {med(arm, 'cpu_us'):.1f} µs/req  errors {sum(r['errors'] for r in rs)}")
        if med(arm, "redis_per_k") is not None:
            line += f"  redis {med(arm, 'redis_per_k'):.2f} commands/1,000 requests"
        print(line)
    print("\nratios (medians of the same run)")
    for n in ("1", "3"):
        on, off = med(f"on-{n}", "rps"), med(f"off-{n}", "rps")
        if on and off:
            print(f"{n} sidecar(s): fleet on / off = {on / off:.3f}x req/s, "
                  f"CPU {med(f'on-{n}', 'cpu_us') - med(f'off-{n}', 'cpu_us'):+.1f} µs/request")


if __name__ == "__main__":
    main()
