#!/usr/bin/env python3
"""Two Collie binaries on the same requests, interleaved round by round:
req/s and CPU µs per request of each (layout L1: the proxy on CPU0 with one
worker thread, the mock and wrk on CPU1; audit off). For a change's own
figure, build the binary before and after it, then

    bench/ab.py before ./collie-before after ./target/release/collie [--rounds 5] [--scenario small]

scenario: small (default), large (200 KiB body), stream, or tenants (small
requests from 1,000 configured tenants, Zipf-distributed, as run.py's). Each round starts
each binary fresh, warms it for 2 s, then measures 5 s with wrk, the way
run.py measures its arms (same wrk script, same CPU count)."""

import argparse
import os
import sys
import tempfile
import shutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("label1")
    ap.add_argument("binary1")
    ap.add_argument("label2")
    ap.add_argument("binary2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scenario", default="small", choices=["small", "large", "stream", "tenants"])
    args = ap.parse_args()
    arms = [(args.label1, os.path.abspath(args.binary1)), (args.label2, os.path.abspath(args.binary2))]
    body = {"small": run.chat_body(300), "large": run.chat_body(200 * 1024), "stream": run.stream_body(),
            "tenants": run.chat_body(300)}[args.scenario]
    n_tenants = 1000 if args.scenario == "tenants" else 0
    tmp = tempfile.mkdtemp(prefix="collie-ab-")
    conf, script = os.path.join(tmp, "collie.yaml"), os.path.join(tmp, "req.lua")
    run.collie_config(conf, n_tenants)
    if n_tenants:
        run.tenants_lua(script, body, n_tenants, zipf=True)
    else:
        run.lua_script(script, body, {"X-Tenant-ID": "bench", "Authorization": f"Bearer {run.BENCH_KEY}"})
    clk = os.sysconf("SC_CLK_TCK")
    procs = run.Procs()
    try:
        procs.start("mock", [f"{run.REL}/collie", "mock", "--listen", f"127.0.0.1:{run.MOCK_PORT}"], "1", run.MOCK_PORT)
        for rnd in range(1, args.rounds + 1):
            for label, binary in arms:
                p = procs.start(label, [binary, "run", "--config", conf], "0", run.COLLIE_PORT)
                run.wrk(run.COLLIE_PORT, script, 2)
                t0 = run.cpu_ticks(p.pid)
                reqs, errors, rps, _ = run.wrk(run.COLLIE_PORT, script, 5)
                cpu_us = (run.cpu_ticks(p.pid) - t0) / clk * 1e6 / max(reqs, 1)
                print(f"{label} round {rnd}: {rps:.0f} req/s, {cpu_us:.1f} µs CPU/request, errors {errors}", flush=True)
                procs.kill(label)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
