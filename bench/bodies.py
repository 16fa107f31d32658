#!/usr/bin/env python3
"""Peak memory with many maximum-size request bodies at once: 64 clients each
send a body of `max_body_bytes` (32 MiB) together, against a release
`collie run` with the in-flight body budget at its default (256 MiB) and,
for comparison, with the budget out of the way. Reports how many were served
and refused (503 overloaded), and the gateway's peak RSS (VmHWM) and the
highest RssAnon seen while polling every 10 ms.

Usage: bench/bodies.py [--clients 64] [--mib 32]   (needs cargo build --release)"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def status_of(port, head, body):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        s.sendall(head)
        try:
            view = memoryview(body)
            for i in range(0, len(body), 1 << 20):
                s.sendall(view[i:i + (1 << 20)])
        except OSError:
            pass  # refused before the body was read: the answer is waiting
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        return 0


def proc_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def one_run(tmp, label, budget, clients, mib):
    conf = os.path.join(tmp, f"{label}.yaml")
    run.collie_config(conf, 0)
    with open(conf, "a") as f:
        f.write(f"max_body_bytes: {mib}MiB\nmax_inflight_body_bytes: {budget}\nclient_timeout: 120s\n")
    p = subprocess.Popen([f"{run.REL}/collie", "run", "--config", conf], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        run.wait_port(run.COLLIE_PORT, timeout=60)
        body = run.chat_body(mib * (1 << 20) - 200).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: bench\r\n"
                f"Authorization: Bearer {run.BENCH_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        idle = proc_field(p.pid, "RssAnon")
        statuses = []
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client():
            start.wait()
            s = status_of(run.COLLIE_PORT, head, body)
            with lock:
                statuses.append(s)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        peak_anon = 0
        while any(t.is_alive() for t in threads):
            peak_anon = max(peak_anon, proc_field(p.pid, "RssAnon"))
            time.sleep(0.01)
        hwm = proc_field(p.pid, "VmHWM")
        served = statuses.count(200)
        refused = statuses.count(503)
        other = len(statuses) - served - refused
        print(f"{label:>10}: budget {budget:>7}, {clients} × {mib} MiB bodies: {served} served, {refused} refused "
              f"(503), {other} other; RssAnon idle {idle // 1024} MiB, peak {peak_anon // 1024} MiB; "
              f"VmHWM {hwm // 1024} MiB", flush=True)
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mib", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="collie-bodies-")
    mock = subprocess.Popen([f"{run.REL}/collie", "mock", "--listen", f"127.0.0.1:{run.MOCK_PORT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run.wait_port(run.MOCK_PORT)
    try:
        one_run(tmp, "capped", "256MiB", args.clients, args.mib)
        one_run(tmp, "uncapped", "64GiB", args.clients, args.mib)
    finally:
        mock.kill()


if __name__ == "__main__":
    main()
