#!/usr/bin/env python3
"""System calls, context switches, page faults and CPU time (user and
kernel apart) per request, for each arm under the same load as run.py's
small (or stream) scenario. It tells whether an arm's extra time is work of
its own or the kernel's, and whether it makes system calls or wakes threads
(futex) that another arm does not.

Each round runs wrk against each arm in turn (layout L1: the proxy pinned
to core 0 with one worker thread, the mock and wrk on core 1) while `perf
stat` counts the proxy's system-call tracepoints; the user and system CPU
time come from /proc/PID/stat over the same run. Counts are per request;
a call made less than once per 200 requests is left out.

    bench/syscalls.py [--arms bare,collie-transport,collie-noaudit,collie]
                      [--rounds 3] [--duration 5] [--scenario small|stream]

Needs perf with tracepoints (Debian `linux-perf`; run as root or with
`kernel.perf_event_paranoid` ≤ -1), wrk, and the release builds
(`cargo build --release -p collie -p collie-bench`)."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

CALLS = ["futex", "sendto", "recvfrom", "read", "write", "writev", "epoll_wait", "epoll_ctl",
         "getpeername", "accept4", "close", "setsockopt", "sched_yield", "clock_gettime",
         "mmap", "munmap", "madvise", "brk", "pwrite64", "pread64", "fdatasync", "fsync"]
EVENTS = ["context-switches", "cpu-migrations", "page-faults"] + [f"syscalls:sys_enter_{c}" for c in CALLS]


def cpu_times(pid):
    """User and system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    clk = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / clk, int(fields[12]) / clk


def counted(path):
    """perf stat's CSV output: event name → count."""
    counts = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                counts[parts[2].replace("syscalls:sys_enter_", "")] = float(parts[0])
    return counts


def measure(pid, port, script, duration, tmp):
    out = os.path.join(tmp, "perf.csv")
    user0, sys0 = cpu_times(pid)
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", ",".join(EVENTS),
                             "-p", str(pid), "--", "sleep", str(duration + 1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    reqs, errors, rps, _ = run.wrk(port, script, duration)
    perf.wait()
    user1, sys1 = cpu_times(pid)
    if not reqs:
        raise RuntimeError(f"port {port}: no request answered")
    if errors:
        print(f"  port {port}: {errors} of {reqs} requests failed (wrk)", flush=True)
    per = {k: v / reqs for k, v in counted(out).items()}
    # perf counted a little before and after wrk's run: idle time, no calls
    # of note (the proxy only waits then).
    return rps, (user1 - user0) * 1e6 / reqs, (sys1 - sys0) * 1e6 / reqs, per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="bare,collie-transport,collie-noaudit,collie")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--scenario", default="small", choices=["small", "stream"])
    args = ap.parse_args()
    for tool in ("perf", "wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool} (apt-get install linux-perf wrk util-linux)")
    arms = args.arms.split(",")
    tmp = tempfile.mkdtemp(prefix="collie-syscalls-")
    procs = run.Procs()
    env = {**os.environ, "RUST_LOG": "warn"}
    try:
        procs.start("mock", [f"{run.REL}/collie", "mock", "--listen", f"127.0.0.1:{run.MOCK_PORT}"], "1", run.MOCK_PORT)
        ports, pids = {}, {}
        variants = run.collie_variants(tmp)
        for arm in arms:
            if arm == "bare":
                port, conf = run.BARE_PORT, None
            else:
                port, admin, audit = variants[arm]
                conf = os.path.join(tmp, f"{arm}.yaml")
                run.collie_config(conf, 0, port, admin, audit)
            pids[arm], ports[arm] = procs.start(arm, run.arm_command(arm, run.REL, port, conf), "0", port, env=env).pid, port
        headers = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {run.BENCH_KEY}"}
        body = run.chat_body(300) if args.scenario == "small" else run.stream_body()
        script = os.path.join(tmp, "load.lua")
        run.lua_script(script, body, headers)
        for rnd in range(args.rounds):
            for arm in arms:
                rps, user, system, per = measure(pids[arm], ports[arm], script, args.duration, tmp)
                calls = "  ".join(f"{k} {v:.3f}" for k, v in per.items() if v >= 0.005)
                print(f"round {rnd + 1} {arm:17} {rps:8.0f} req/s  user {user:5.1f} µs  sys {system:5.1f} µs  {calls}",
                      flush=True)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
