#!/usr/bin/env python3
"""Memory per tenant: RSS of an idle `collie run` with 1, 1k, 10k and 100k
tenants (each with its quota ledger), after start and after every tenant has
sent one request; the total (VmRSS) and its RssAnon and RssFile parts from
/proc/PID/status. Where there are at least twice `--touch` tenants, a second
batch of as many tenants sends a request too, and the cost per tenant with
traffic is also given from that batch alone: the first batch's figure
includes memory the allocator gives back once traffic runs (what start-up
freed), which can make it small or even negative.
Usage: bench/memory.py [--counts 1,1000,10000,100000] [--touch 1000] [--json FILE]"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,1000,10000,100000")
    ap.add_argument("--touch", type=int, default=1000, help="tenants that send one request each")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="collie-mem-")
    mock = subprocess.Popen([f"{run.REL}/collie", "mock", "--listen", f"127.0.0.1:{run.MOCK_PORT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run.wait_port(run.MOCK_PORT)
    results = []
    try:
        for n in [int(c) for c in args.counts.split(",")]:
            conf = os.path.join(tmp, f"c{n}.yaml")
            run.collie_config(conf, n)
            t0 = time.time()
            p = subprocess.Popen([f"{run.REL}/collie", "run", "--config", conf], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
            run.wait_port(run.COLLIE_PORT, timeout=300)
            started = time.time() - t0
            time.sleep(1)
            idle = run.rss(p.pid)
            body = run.chat_body(300)

            def send(tenants):
                for i in tenants:
                    s = socket.create_connection(("127.0.0.1", run.COLLIE_PORT))
                    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: t{i}\r\nAuthorization: Bearer sk-t{i}\r\n"
                               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode())
                    while s.recv(65536):
                        pass
                    s.close()

            touch = min(n, args.touch)
            send(range(touch))
            used = run.rss(p.pid)
            second = None
            if n >= 2 * touch:
                send(range(touch, 2 * touch))
                second = run.rss(p.pid)
            p.kill()
            p.wait()
            results.append((n, started, idle, used, touch, second))
            print(f"{n:>7} tenants: start {started:5.1f} s, RSS idle {run.fmt_rss(idle)}, "
                  f"after {touch} tenants sent a request {run.fmt_rss(used)}"
                  + (f", after {touch} more {run.fmt_rss(second)}" if second else ""), flush=True)
    finally:
        mock.kill()
    print(f"\n{'tenants':>7} {'start s':>7} {'idle RSS':>9} {'anon':>9} {'file':>9}   {'after RSS':>9} {'anon':>9} {'file':>9}  (KiB)")
    for n, started, idle, used, _, _ in results:
        print(f"{n:>7} {started:7.1f} {idle['total']:9} {idle['anon']:9} {idle['file']:9}   {used['total']:9} {used['anon']:9} {used['file']:9}")
    # Per-tenant figures from the anonymous part: the file-backed part is the
    # binary and mapped files, the same whatever the tenant count.
    base = results[0]
    for n, _, idle, used, touch, second in results[1:]:
        print(f"{n:>7} tenants: {(idle['anon'] - base[2]['anon']) * 1024 / (n - base[0]):.0f} bytes (RssAnon) per configured tenant; "
              f"{(used['anon'] - idle['anon']) * 1024 / max(touch, 1):.0f} bytes per tenant that sent traffic"
              + (f"; {(second['anon'] - used['anon']) * 1024 / max(touch, 1):.0f} in the second batch" if second else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"tenants": n, "start_s": started, "touched": touch, "idle_kib": idle, "after_kib": used,
                        "after_second_batch_kib": second}
                       for n, started, idle, used, touch, second in results], f, indent=1)


if __name__ == "__main__":
    main()
