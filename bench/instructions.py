#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: a figure that
does not move with the machine's neighbours, for telling small changes
apart where CPU time per request (run.py, ab.py) is lost in the noise.

Each arm runs under callgrind (one worker thread, as in layout L1) behind
the same mock; after a warm-up its counters are zeroed, N small chat
requests are sent one after another on one kept-alive connection, and the
counters are dumped. Instructions, not time: a copy done with `rep movsb`
counts one instruction per byte moved here, while the CPU moves dozens of
bytes a cycle, and a system call counts none of the kernel's work. Valgrind
does not offer the CPU's SHA extensions either, so `sha2` runs its portable
code under it: the trail's SHA-256s (request hash, chain hash) count several
times what they cost on a CPU with SHA-NI (use `audit-cost` for those).

    bench/instructions.py [--arms bare,collie-transport,collie-noaudit,collie] [--requests 1000]
                          [--scenario small|large|stream] [--tenants N] [--bin DIR]

`--tenants N` configures N more tenants and sends each request as the next
of them in turn (the warm-up goes round all of them first, so what a
tenant's first request creates is not counted); bare Pingora ignores the
tenant.

Needs valgrind (`apt-get install valgrind`) and the release builds
(`cargo build --release -p collie -p collie-bench`); `--bin
target/profiling` takes the profiling build instead, whose callgrind files
(kept with --keep DIR) name every function for `callgrind_annotate`."""

import argparse
import glob
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

HEADERS = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {run.BENCH_KEY}", "Content-Type": "application/json"}


def send(body, n, tenants=0):
    """n requests, one after another, on one kept-alive connection; with
    `tenants`, from tenants t0, t1, … in turn."""
    c = http.client.HTTPConnection("127.0.0.1", run.COLLIE_PORT, timeout=30)
    try:
        for i in range(n):
            headers = HEADERS
            if tenants:
                t = i % tenants
                headers = {**HEADERS, "X-Tenant-ID": f"t{t}", "Authorization": f"Bearer sk-t{t}"}
            c.request("POST", "/v1/chat/completions", body=body, headers=headers)
            r = c.getresponse()
            answer = r.read()
            if r.status != 200:
                raise RuntimeError(f"answered {r.status}: {answer[:200]!r}")
    finally:
        c.close()


def counted(out_dir, tag):
    """Instructions in the dump named `tag` (callgrind writes one file per
    dump), and its file; None while it is not written yet."""
    for path in glob.glob(os.path.join(out_dir, "callgrind.out*")):
        with open(path) as f:
            text = f.read()
        head = text[:4000]
        # Valgrind has named the trigger both ways.
        if f"Trigger: dump {tag}" not in head and f"Trigger: Client Request: {tag}" not in head:
            continue
        for line in text.splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]), path
    return None


def measure(arm, binary_dir, conf, body, n, keep, tenants=0):
    cmd = run.arm_command(arm, binary_dir, run.COLLIE_PORT, conf["sqlite" if arm == "collie" else "off"])
    out_dir = tempfile.mkdtemp(prefix=f"collie-cg-{arm}-")
    grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
             "--dump-instr=no", "--collect-jumps=no"]
    procs = run.Procs()
    try:
        p = procs.start(arm, grind + cmd, "0", run.COLLIE_PORT, timeout=120)
        # A whole turn of the tenants: n from here on is also a whole number
        # of turns when it is a multiple of them.
        send(body, max(200, tenants), tenants)
        subprocess.run(["callgrind_control", "--zero", str(p.pid)], capture_output=True, check=True)
        send(body, n, tenants)
        # What the request's end does after the answer (settlement, audit
        # record) runs just after it is sent.
        time.sleep(1)
        subprocess.run(["callgrind_control", "--dump=measured", str(p.pid)], capture_output=True, check=True)
        found, deadline = None, time.time() + 10
        while found is None and time.time() < deadline:
            time.sleep(0.1)
            found = counted(out_dir, "measured")
        if found is None:
            raise RuntimeError(f"{arm}: no callgrind dump named measured in {out_dir}")
        total, path = found
        if keep:
            shutil.copy(path, os.path.join(keep, f"callgrind.{arm}"))
        return total / n
    finally:
        procs.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="bare,collie-transport,collie-noaudit,collie")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--scenario", default="small", choices=["small", "large", "stream"])
    ap.add_argument("--tenants", type=int, default=0, help="send from this many tenants in turn")
    ap.add_argument("--bin", default=run.REL, help="where the binaries are (default: the release build)")
    ap.add_argument("--keep", help="copy each arm's callgrind file here")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed: apt-get install valgrind")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    body = {"small": run.chat_body(300), "large": run.chat_body(200 * 1024), "stream": run.stream_body()}[args.scenario]
    tmp = tempfile.mkdtemp(prefix="collie-instructions-")
    conf = {"off": os.path.join(tmp, "off.yaml"), "sqlite": os.path.join(tmp, "sqlite.yaml")}
    run.collie_config(conf["off"], args.tenants)
    run.collie_config(conf["sqlite"], args.tenants, audit="{sink: sqlite, sqlite_path: \"%s\"}" % os.path.join(tmp, "audit.db"))
    mock = run.Procs()
    try:
        mock.start("mock", [f"{run.REL}/collie", "mock", "--listen", f"127.0.0.1:{run.MOCK_PORT}"], "1", run.MOCK_PORT)
        results = {}
        for arm in args.arms.split(","):
            results[arm] = measure(arm, args.bin, conf, body.encode(), args.requests, args.keep, args.tenants)
            base = results.get("bare")
            vs = f"  ({results[arm] / base:.2f}× bare)" if base and arm != "bare" else ""
            label = f"{args.scenario}/{args.tenants}t" if args.tenants else args.scenario
            print(f"{label:6} {arm:17} {results[arm]:10,.0f} instructions per request{vs}", flush=True)
    finally:
        mock.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
