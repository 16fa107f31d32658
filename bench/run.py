#!/usr/bin/env python3
"""Collie's benchmark: the same requests through four arms, interleaved and
repeated, with the proxy pinned as bench/../shared BENCH.md describes.

Arms: direct (load → mock), bare Pingora (bench/tools bare-pingora), nginx
(nginx-light, 1 worker, upstream keepalive), collie-transport (Collie's
gateway with its policy off: the transport alone), collie (full policy: auth,
body inspection, quota ledger, metrics, audit to SQLite), collie-noaudit,
collie-pg; on request (--arms …,collie-nohash) the SQLite trail without its
request-hash index, and (--arms …,litellm) LiteLLM's proxy from PyPI, one
worker, installed on first use into a virtualenv under the target dir.

Layout L1 (default): the proxy on CPU0 with one worker thread, the mock and
the load tool on CPU1. Ceiling numbers count only when the proxy's core was
≥95% busy, and the script says when it was not.

Measures per arm and scenario:
  - req/s at saturation (wrk, closed loop, 64 connections),
  - proxy CPU µs per request (Δ utime+stime from /proc/PID/stat ÷ requests),
  - latency p50/p99 at a fixed 1,000 req/s (rate-probe), and the difference to
    the direct arm (added latency); for streams, to the end of the stream
    (skipped for an arm whose ceiling is under 1,200 req/s),
  - RSS of each proxy at start and after the run, with its RssAnon and
    RssFile parts (/proc/PID/status).
Before a scenario is timed, every arm must answer one request with a 200 and
the mock's content.
Streamed requests are timed with bench/tools sse-probe (TTFT, gaps).

Usage: bench/run.py [--rounds 3] [--duration 10] [--quick] [--scenarios small,large,stream,tenants,panic,streams]
                    [--arms direct,bare,nginx,collie-transport,collie,collie-noaudit,collie-pg,collie-nohash,litellm]
Needs: release builds (cargo build --release -p collie -p collie-bench),
wrk, nginx (nginx-light), taskset. Fixed-rate latency comes from
bench/tools rate-probe (open loop, coordinated omission corrected, tenant
chosen per request).
"""

import argparse
import json
import os
import re
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
MOCK_PORT, BARE_PORT, NGINX_PORT, COLLIE_PORT, ADMIN_PORT = 9201, 8181, 8182, 8183, 9183
NOAUDIT_PORT, NOAUDIT_ADMIN, PG_PORT, PG_ADMIN = 8184, 9184, 8185, 9185
TRANSPORT_PORT, TRANSPORT_ADMIN = 8186, 9186
NOHASH_PORT, NOHASH_ADMIN = 8188, 9188
LITELLM_PORT = 8187
# LiteLLM's proxy from PyPI, pinned: an exact version keeps runs comparable,
# and a release that was pulled from PyPI is never picked up by accident.
# (1.108 and later need `litellm-proxy` / `litellm-proxy-extras` releases
# that PyPI does not serve here, so `[proxy]` does not resolve for them.)
# LITELLM_VERSION overrides it.
LITELLM_VERSION = os.environ.get("LITELLM_VERSION", "1.106.12")
PG_URL = "postgres://postgres@127.0.0.1:5432/test"
# Layout L1 (default): proxy pinned to CPU0 with one worker thread, mock and
# load on CPU1. L3 (--layout l3): nothing pinned, default worker threads.
PIN = True
THREADS = "1"
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
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss(pid):
    """Resident memory from /proc/PID/status in KiB: the total (VmRSS) and its
    anonymous (heap, stacks) and file-backed (binary, mapped files such as an
    SQLite trail; page cache the kernel can drop) parts. RSS = anon + file +
    shmem."""
    out = {"total": 0, "anon": 0, "file": 0}
    keys = {"VmRSS:": "total", "RssAnon:": "anon", "RssFile:": "file"}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = keys.get(line.split(":", 1)[0] + ":")
            if key:
                out[key] = int(line.split()[1])
    return out


def fmt_rss(m):
    return f"{m['total']} KiB (anon {m['anon']}, file {m['file']})"


def nginx_worker(master):
    """Nginx's master process does no work; its one worker does."""
    return int(subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()[0])


def chat_body(size):
    """A chat request of about `size` bytes with `model` last, as the SDK sends it."""
    filler = max(0, size - 120)
    content = ("lorem ipsum dolor sit amet " * (filler // 27 + 1))[:filler]
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 16, "model": "bench"})


def stream_body():
    return json.dumps({"messages": [{"role": "user", "content": "stream please"}], "max_tokens": 16, "stream": True, "model": "bench"})


def collie_config(path, tenants, port=None, admin=None, audit="{sink: off}", capacity=256):
    lines = [
        f"listen: 127.0.0.1:{port or COLLIE_PORT}",
        f"admin_listen: 127.0.0.1:{admin or ADMIN_PORT}",
        f"threads: {THREADS}",
        f"audit: {audit}",
        "quota:",
        "  rebalance: {enabled: true}",
        "  defaults: {rpm: 100000000, tpm: 100000000000, requests_per_day: 1000000000, usd_per_day: 1000000.0}",
        "tenants:",
        f"  - {{id: bench, api_keys: [\"{KEY_DIGEST}\"], models: [\"*\"], priority: 1}}",
    ]
    for i in range(tenants):
        digest = __import__("hashlib").sha256(f"sk-t{i}".encode()).hexdigest()
        lines.append(f"  - {{id: t{i}, api_keys: [\"{digest}\"], models: [\"*\"], priority: {1 + i % 5}}}")
    lines += [
        "models:",
        "  - {name: bench, fallback: [p]}",
        "pools:",
        "  - id: p",
        # Priority admission and rebalancing are on the path (every request
        # takes and returns a slot); the capacity is above wrk's 64 requests
        # in flight, so requests are not queued: a queue would measure the
        # configured capacity, not the proxy.
        f"    max_concurrency: {capacity}",
        "    deployments: [{deployment: d1, weight: 1}, {deployment: d2, weight: 1}, {deployment: d3, weight: 1}]",
        "deployments:",
    ]
    for i in (1, 2, 3):
        lines.append(f"  - {{id: d{i}, base_url: \"http://127.0.0.1:{MOCK_PORT}/v1\", model: bench-upstream}}")
    lines += ["pricing:", "  bench-upstream: {input_per_mtok: 1.0, output_per_mtok: 2.0}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_buffer_size 4m;
  client_max_body_size 64m;
  upstream mock {{ server 127.0.0.1:{mock}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering on;
    }}
  }}
}}
"""


def collie_variants(tmp):
    """Collie's arms: name → (port, admin port, `audit` section). collie:
    the full policy, audit to SQLite; collie-noaudit: the same without the
    audit trail; collie-pg: audit to PostgreSQL."""
    return {
        "collie": (COLLIE_PORT, ADMIN_PORT, "{sink: sqlite, sqlite_path: \"%s\"}" % os.path.join(tmp, "audit.db")),
        "collie-noaudit": (NOAUDIT_PORT, NOAUDIT_ADMIN, "{sink: off}"),
        "collie-pg": (PG_PORT, PG_ADMIN, "{sink: postgres, postgres_url_env: COLLIE_BENCH_PG, postgres_schema: collie_bench}"),
        # Collie's gateway with the policy off (bench/tools
        # collie-transport): the transport alone, to split the cost.
        "collie-transport": (TRANSPORT_PORT, TRANSPORT_ADMIN, "{sink: off}"),
        # The SQLite trail without its request-hash index
        # (audit.request_hash_index: false).
        "collie-nohash": (NOHASH_PORT, NOHASH_ADMIN, "{sink: sqlite, sqlite_path: \"%s\", request_hash_index: false}"
                          % os.path.join(tmp, "audit-nohash.db")),
    }


def arm_command(arm, binary_dir, port, conf=None):
    """The command that runs a proxy arm from `binary_dir`: bare Pingora
    listening on `port` in front of the mock, or a Collie arm with the
    config `conf` (which names its port)."""
    if arm == "bare":
        return [f"{binary_dir}/bare-pingora", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{MOCK_PORT}",
                "--threads", THREADS]
    if arm == "collie-transport":
        return [f"{binary_dir}/collie-transport", "--config", conf]
    return [f"{binary_dir}/collie", "run", "--config", conf]


def litellm_venv():
    """The virtualenv with `litellm[proxy]`, made on first use under the
    target dir (packages from PyPI through pip); returns its `litellm` script."""
    venv = os.path.join(os.path.dirname(REL), "litellm-venv")
    exe = os.path.join(venv, "bin", "litellm")
    stamp = os.path.join(venv, "installed-version")
    try:
        with open(stamp) as f:
            if f.read().strip() == LITELLM_VERSION and os.path.exists(exe):
                return exe
    except OSError:
        pass
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (first use)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--quiet", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    with open(stamp, "w") as f:
        f.write(LITELLM_VERSION + "\n")
    return exe


def litellm_config(path):
    """Model `bench` to the mock as an OpenAI-compatible provider; no
    database, no callbacks, no retries. The master key is the bench's key
    (it refuses to start without one): every request is checked against it,
    as Collie checks its tenant key."""
    with open(path, "w") as f:
        f.write(f"""model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{MOCK_PORT}/v1
      api_key: sk-mock
litellm_settings:
  num_retries: 0
  request_timeout: 30
general_settings:
  master_key: {BENCH_KEY}
  disable_spend_logs: true
  disable_error_logs: true
""")


def litellm_env():
    """What LiteLLM would otherwise fetch or do per start or request: the
    model cost map (downloaded at import unless told to use its own copy), a
    database (none: no DATABASE_URL), a log line per request (uvicorn's
    access log follows LITELLM_LOG). The pinned release sends no telemetry
    (its --telemetry flag is a no-op)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL")}
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",  # no .env file loading
        "DISABLE_ADMIN_UI": "True",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    return env


def check_answer(port, body, headers, stream):
    """One request through an arm: a 200 whose content is the mock's (for a
    stream, the content events joined, and `[DONE]` at the end). Returns the
    content, or raises."""
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=30) as resp:
        status, text = resp.status, resp.read().decode()
    if status != 200:
        raise RuntimeError(f"port {port}: status {status}")
    if not stream:
        return json.loads(text)["choices"][0]["message"]["content"]
    events = [l[len("data:"):].strip() for l in text.splitlines() if l.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        raise RuntimeError(f"port {port}: stream without [DONE]: {text[-200:]!r}")
    content = ""
    for e in events[:-1]:
        for c in json.loads(e).get("choices", []):
            content += (c.get("delta") or {}).get("content") or ""
    return content


class Procs:
    def __init__(self):
        self.procs = {}

    def start(self, name, cmd, cpus, port, env=None, timeout=10.0, log=None):
        full = (["taskset", "-c", cpus] if PIN else []) + cmd
        out = open(log, "w") if log else subprocess.DEVNULL
        p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL, env=env, start_new_session=True)
        if log:
            out.close()
        self.procs[name] = p
        try:
            wait_port(port, timeout)
        except RuntimeError:
            tail = open(log).read()[-2000:] if log else ""
            raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f} s (exit {p.poll()}){tail and chr(10) + tail}")
        return p

    def kill(self, name):
        """Stop one process (and its group) and forget it."""
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop(self):
        for name in list(self.procs):
            self.kill(name)


def lua_script(path, body, headers):
    hdr = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    with open(path, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n{hdr}\n'
                'done = function(summary, latency, requests)\n'
                '  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.status, summary.duration, summary.errors.timeout))\n'
                'end\n')


def tenants_lua(path, body, n, zipf):
    """Pick a tenant per request, uniformly or Zipf-distributed (s = 1)."""
    with open(path, "w") as f:
        f.write(f'''
local body = {json.dumps(body)}
local n = {n}
local cdf = {{}}
local total = 0
for i = 1, n do total = total + ({"1 / i" if zipf else "1"}); cdf[i] = total end
for i = 1, n do cdf[i] = cdf[i] / total end
math.randomseed(os.time())
request = function()
  local r = math.random()
  local lo, hi = 1, n
  while lo < hi do local mid = math.floor((lo + hi) / 2); if cdf[mid] < r then lo = mid + 1 else hi = mid end end
  local t = lo - 1
  return wrk.format("POST", "/v1/chat/completions", {{["Content-Type"] = "application/json", ["X-Tenant-ID"] = "t" .. t, ["Authorization"] = "Bearer sk-t" .. t}}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.status, summary.duration, summary.errors.timeout))
end
''')


def wrk(port, script, duration, conns=64):
    pin = ["taskset", "-c", "1"] if PIN else []
    out = subprocess.run(pin + ["wrk", "-t1" if PIN else "-t2", f"-c{conns}", f"-d{duration}s", "-s", script,
                          f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True).stdout
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(out)
    reqs, sock_err, status_err, dur_us, timeouts = map(int, m.groups())
    # wrk gives up on a request after 2 s (a timeout); non-2xx are answers.
    kinds = {"socket": sock_err, "timeout": timeouts, "non2xx": status_err}
    return reqs, sock_err + timeouts + status_err, reqs / (dur_us / 1e6), kinds


def rate_probe(port, body_file, headers, rate, duration, tenants=0):
    """Latency at a fixed rate, corrected for coordinated omission (each
    request timed from when it was due), with the tenant chosen per request
    when `tenants` is set (Zipf, as in the saturation run)."""
    cmd = (["taskset", "-c", "1"] if PIN else []) + [f"{REL}/rate-probe", "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
           "--body-file", body_file, "--rate", str(rate), "--duration", str(duration), "-c", "32", "--json"]
    if tenants:
        cmd += ["--tenants", str(tenants), "--zipf"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
    data = json.loads(out[-1])
    return data["p50_us"], data["p99_us"], data["errors"] + data["non2xx"]


def dropped_records(admin_port):
    """Audit records the writer dropped (queue full): a throughput bought
    with lost records would not count."""
    try:
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("collie_audit_dropped_total"))


def sse_probe_cmd(port, headers, n, concurrency):
    """sse-probe on the load's core: `n` streamed requests, `concurrency` at once."""
    cmd = (["taskset", "-c", "1"] if PIN else []) + [f"{REL}/sse-probe", "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
           "-n", str(n), "-c", str(concurrency), "--json", "--body", stream_body()]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    return cmd


def sse_probe(port, headers, n=300):
    """TTFT and inter-event gaps of streamed responses at concurrency 1."""
    out = subprocess.run(sse_probe_cmd(port, headers, n, 1), capture_output=True, text=True).stdout.strip().splitlines()
    return json.loads(out[-1]) if out else None


PANIC_PORT, PANIC_ADMIN = 8186, 9186


def panic_mode(procs, tmp, env, duration):
    """Every deployment of the model unhealthy (its port refuses; probes mark
    it so): how fast Collie answers 503 + Retry-After instead of waiting."""
    conf = os.path.join(tmp, "panic.yaml")
    dead = free_port()
    collie_config(conf, 0, PANIC_PORT, PANIC_ADMIN)
    with open(conf) as f:
        text = f.read().replace(f"127.0.0.1:{MOCK_PORT}", f"127.0.0.1:{dead}")
    text = text.replace("model: bench-upstream}", "model: bench-upstream, health: {probe: connect, interval: 1s, unhealthy_after: 1}}")
    with open(conf, "w") as f:
        f.write(text)
    procs.start("collie-panic", [f"{REL}/collie", "run", "--config", conf], "0", PANIC_PORT, env=env)
    import urllib.request
    for _ in range(100):
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{PANIC_ADMIN}/status", timeout=2).read())
        states = [d.get("state") for d in status.get("deployments", [])]
        if states and all(s == "unhealthy" for s in states):
            break
        time.sleep(0.1)
    body_file = os.path.join(tmp, "panic.json")
    with open(body_file, "w") as f:
        f.write(chat_body(300))
    headers = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {BENCH_KEY}"}
    cmd = (["taskset", "-c", "1"] if PIN else []) + [f"{REL}/rate-probe", "--url", f"http://127.0.0.1:{PANIC_PORT}/v1/chat/completions",
           "--body-file", body_file, "--rate", "1000", "--duration", str(duration), "-c", "32", "--json"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    data = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"panic    collie         {data['requests']} requests, {data['non2xx']} answered 503: p50 {data['p50_us']:.0f} µs, p99 {data['p99_us']:.0f} µs, p99.9 {data['p999_us']:.0f} µs", flush=True)
    return data


STREAMS_PORT, STREAMS_ADMIN = 8188, 9188


def concurrent_streams(procs, tmp, env, arms, counts=(1024, 4096), seconds=4):
    """Memory while holding many streams at once. For each arm and count,
    the proxy is started fresh, `count` streams of `seconds` each (the mock
    sends 8 content events, evenly spaced) are opened together, and the
    proxy's RSS is polled while they run: its peak RssAnon and RssFile, and
    whether every stream completed with its `[DONE]`."""
    headers = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {BENCH_KEY}",
               "x-mock-chunks": "8", "x-mock-interval-ms": str(seconds * 1000 // 8)}
    out = {}
    for arm in arms:
        for n in counts:
            name = f"streams-{arm}-{n}"
            if arm == "bare":
                cmd = arm_command("bare", REL, STREAMS_PORT)
            else:
                audit = "{sink: sqlite, sqlite_path: \"%s\"}" % os.path.join(tmp, f"{name}.db") if arm == "collie" else "{sink: off}"
                conf = os.path.join(tmp, f"{name}.yaml")
                # Room for every stream in the pool: a queue would hold
                # requests, not streams.
                collie_config(conf, 0, STREAMS_PORT, STREAMS_ADMIN, audit, capacity=n + 64)
                cmd = arm_command(arm, REL, STREAMS_PORT, conf)
            p = procs.start(name, cmd, "0", STREAMS_PORT, env=env)
            idle = rss(p.pid)
            probe = subprocess.Popen(sse_probe_cmd(STREAMS_PORT, headers, n, n), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
            peak = dict(idle)
            while probe.poll() is None:
                now = rss(p.pid)
                peak = {k: max(peak[k], now[k]) for k in peak}
                time.sleep(0.05)
            lines = probe.stdout.read().strip().splitlines()
            data = json.loads(lines[-1]) if lines else {}
            procs.kill(name)
            complete = data.get("streams", 0) - data.get("errors", 0) - data.get("incomplete", 0)
            out.setdefault(arm, {})[n] = {"idle": idle, "peak": peak, "probe": data, "complete": complete}
            print(f"streams  {arm:14} {n:5} at once: peak RSS {peak['total']} KiB (anon {peak['anon']}, file {peak['file']}), "
                  f"idle anon {idle['anon']} KiB; {complete}/{n} streams complete, errors {data.get('errors')}, incomplete {data.get('incomplete')}", flush=True)
    return out


def error_kinds(rounds):
    """' (timeout 3, non2xx 1)' over the rounds, or '' when there were none."""
    kinds = {}
    for r in rounds:
        for k, v in r.get("error_kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    parts = [f"{k} {v}" for k, v in kinds.items() if v]
    return f" ({', '.join(parts)})" if parts else ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scenarios", default="small,large,stream,tenants,panic,streams")
    # litellm is not in the default list: its first use installs it from
    # PyPI, and at about a hundred req/s here it makes a run longer.
    ap.add_argument("--arms", default="direct,bare,nginx,collie-transport,collie,collie-noaudit,collie-pg",
                    help="comma-separated; also: litellm (LiteLLM's proxy, installed on first use)")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--layout", default="l1", choices=["l1", "l3"])
    args = ap.parse_args()
    # Thousands of streams at once: two sockets each in the proxy, one in
    # the probe and one in the mock (the children inherit the limit).
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    global PIN, THREADS
    if args.layout == "l3":
        PIN, THREADS = False, str(os.cpu_count() or 2)
    if args.quick:
        args.rounds, args.duration = 1, 3
    for tool in ("wrk", "nginx", "taskset"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"missing {tool}")
    if "collie-pg" in args.arms.split(","):
        # Start from an empty audit schema so runs do not pile rows up.
        subprocess.run(["psql", "-q", PG_URL, "-c", "DROP SCHEMA IF EXISTS collie_bench CASCADE"],
                       capture_output=True)
    tmp = tempfile.mkdtemp(prefix="collie-bench-")
    procs = Procs()
    results = {}
    clk = os.sysconf("SC_CLK_TCK")
    try:
        procs.start("mock", [f"{REL}/collie", "mock", "--listen", f"127.0.0.1:{MOCK_PORT}"], "1", MOCK_PORT)
        procs.start("bare", arm_command("bare", REL, BARE_PORT), "0", BARE_PORT)
        nginx_dir = os.path.join(tmp, "nginx")
        os.makedirs(nginx_dir)
        with open(os.path.join(nginx_dir, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(dir=nginx_dir, mock=MOCK_PORT, port=NGINX_PORT))
        procs.start("nginx", ["/usr/sbin/nginx", "-c", os.path.join(nginx_dir, "nginx.conf"), "-p", nginx_dir], "0", NGINX_PORT)
        n_tenants = 1000 if "tenants" in args.scenarios else 0
        env = {**os.environ, "RUST_LOG": "warn", "COLLIE_BENCH_PG": PG_URL}
        variants = collie_variants(tmp)
        ports = {"direct": MOCK_PORT, "bare": BARE_PORT, "nginx": NGINX_PORT}
        admins = {}
        pids = {"direct": procs.procs["mock"].pid, "bare": procs.procs["bare"].pid, "nginx": procs.procs["nginx"].pid}
        for name, (port, admin, audit) in variants.items():
            if name not in args.arms.split(","):
                continue
            conf = os.path.join(tmp, f"{name}.yaml")
            collie_config(conf, n_tenants, port, admin, audit)
            p = procs.start(name, arm_command(name, REL, port, conf), "0", port, env=env)
            ports[name], pids[name] = port, p.pid
            if name != "collie-transport":
                admins[name] = admin
        if "litellm" in args.arms.split(","):
            # One worker in both layouts: more would be separate processes,
            # which the CPU count of one PID would miss.
            conf = os.path.join(tmp, "litellm.yaml")
            litellm_config(conf)
            p = procs.start("litellm", [litellm_venv(), "--config", conf, "--host", "127.0.0.1", "--port", str(LITELLM_PORT),
                                        "--num_workers", "1"],
                            "0", LITELLM_PORT, env=litellm_env(), timeout=180, log=os.path.join(tmp, "litellm.log"))
            ports["litellm"], pids["litellm"] = LITELLM_PORT, p.pid
        # Memory of every proxy arm (nginx: its worker), at start and after the run.
        watched = {arm: pids[arm] for arm in args.arms.split(",") if arm != "direct" and arm in pids}
        if "nginx" in watched:
            watched["nginx"] = nginx_worker(pids["nginx"])
        mem_idle = {arm: rss(pid) for arm, pid in watched.items()}
        headers = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {BENCH_KEY}"}
        scen = {"small": chat_body(300), "large": chat_body(200 * 1024), "stream": stream_body(), "tenants": chat_body(300)}
        arms = args.arms.split(",")
        for name in args.scenarios.split(","):
            if name in ("panic", "streams"):
                continue
            body = scen[name]
            body_file = os.path.join(tmp, f"{name}.json")
            with open(body_file, "w") as f:
                f.write(body)
            script = os.path.join(tmp, f"{name}.lua")
            if name == "tenants":
                tenants_lua(script, body, n_tenants, zipf=True)
                run_arms = [a for a in arms if a.startswith("collie") and a != "collie-transport"]
            else:
                lua_script(script, body, headers)
                run_arms = arms
                # Every arm answers 200 with the mock's content before it is
                # timed (wrk counts non-2xx; it cannot see a body).
                want = check_answer(MOCK_PORT, body, headers, name == "stream")
                for arm in run_arms:
                    got = check_answer(ports[arm], body, headers, name == "stream")
                    if got != want:
                        raise RuntimeError(f"{name}: {arm} answered {got!r}, the mock {want!r}")
                print(f"{name:8} every arm answered 200 with the mock's content ({want!r})", flush=True)
            for rnd in range(args.rounds):
                for arm in run_arms:
                    pid = nginx_worker(pids[arm]) if arm == "nginx" else pids[arm]
                    t0 = cpu_ticks(pid)
                    w0 = time.time()
                    reqs, errors, rps, kinds = wrk(ports[arm], script, args.duration)
                    busy = (cpu_ticks(pid) - t0) / clk / (time.time() - w0)
                    cpu_us = (cpu_ticks(pid) - t0) / clk * 1e6 / max(reqs, 1)
                    probe = sse_probe(ports[arm], headers) if name == "stream" else None
                    if rps < 1200 and arm != "direct":
                        # 1,000 req/s is at or above this arm's ceiling: the
                        # fixed-rate probe would measure its queue.
                        p50 = p99 = None
                        lat_err = 0
                    elif name == "tenants":
                        p50, p99, lat_err = rate_probe(ports[arm], body_file, {}, 1000, args.duration, tenants=n_tenants)
                    else:
                        p50, p99, lat_err = rate_probe(ports[arm], body_file, headers, 1000, args.duration)
                    r = results.setdefault(name, {}).setdefault(arm, [])
                    r.append({"rps": rps, "errors": errors, "error_kinds": kinds, "busy": busy, "cpu_us": cpu_us, "p50_us": p50, "p99_us": p99, "lat_errors": lat_err, "sse": probe})
                    print(f"{name:8} {arm:14} round {rnd}: {rps:9.0f} req/s  cpu {cpu_us:6.1f} µs/req  busy {busy:4.0%}  "
                          f"p50 {p50 if p50 is None else round(p50)} µs  p99 {p99 if p99 is None else round(p99)} µs  errors {errors}/{lat_err}"
                          + (f" ({', '.join(f'{k} {v}' for k, v in kinds.items() if v)})" if errors else "")
                          + (f"  sse ttft p50/p99 {probe['ttft_p50_us']}/{probe['ttft_p99_us']} µs gap p99 {probe['gap_p99_us']} µs errors {probe['errors']} incomplete {probe['incomplete']} usage {probe['with_usage']}/{probe['streams']}" if probe else ""), flush=True)
        results["rss_kib"] = {"tenants": n_tenants,
                              "arms": {arm: {"idle": mem_idle[arm], "after": rss(pid)} for arm, pid in watched.items()}}
        results["audit_dropped"] = {arm: dropped_records(admin) for arm, admin in admins.items()}
        if "panic" in args.scenarios.split(","):
            results["panic"] = panic_mode(procs, tmp, env, args.duration)
        if "streams" in args.scenarios.split(","):
            stream_arms = [a for a in ("bare", "collie-noaudit", "collie") if a in arms]
            results["streams"] = concurrent_streams(procs, tmp, env, stream_arms)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\nmedians (spread = min..max over rounds)")
    for name, by_arm in results.items():
        if name in ("rss_kib", "audit_dropped", "panic", "streams"):
            continue
        direct = by_arm.get("direct")
        for arm, rs in by_arm.items():
            med = lambda k: statistics.median([r[k] for r in rs if r[k] is not None]) if any(r[k] is not None for r in rs) else None
            rps = med("rps")
            line = f"{name:8} {arm:14} {rps:9.0f} req/s ({min(r['rps'] for r in rs):.0f}..{max(r['rps'] for r in rs):.0f})  cpu {med('cpu_us'):.1f} µs/req  busy {med('busy'):.0%}"
            if "bare" in by_arm and arm != "bare":
                line += f"  vs bare {rps / statistics.median([r['rps'] for r in by_arm['bare']]):.2f}x"
            if med("p50_us") is not None:
                line += f"  p50 {med('p50_us'):.0f} µs p99 {med('p99_us'):.0f} µs"
                if direct and arm != "direct" and direct[0]["p50_us"] is not None:
                    line += f"  (added p50 {med('p50_us') - statistics.median([r['p50_us'] for r in direct]):+.0f} µs, p99 {med('p99_us') - statistics.median([r['p99_us'] for r in direct]):+.0f} µs)"
            line += f"  errors {sum(r['errors'] for r in rs)}{error_kinds(rs)}"
            probes = [r["sse"] for r in rs if r.get("sse")]
            if probes:
                line += f"  sse ttft p50 {statistics.median(p['ttft_p50_us'] for p in probes):.0f} p99 {statistics.median(p['ttft_p99_us'] for p in probes):.0f} µs, gap p99 {statistics.median(p['gap_p99_us'] for p in probes):.0f} µs, stream errors {sum(p['errors'] + p['incomplete'] for p in probes)}"
            if med("busy") < 0.95 and arm != "direct":
                line += "  [proxy core <95% busy: not a ceiling]"
            print(line)
    print(f"\nmemory from /proc/PID/status, KiB: RSS (RssAnon, RssFile); {results['rss_kib']['tenants']} tenants configured in the collie arms")
    print(f"{'arm':14} {'idle RSS':>9} {'anon':>9} {'file':>9}   {'after RSS':>9} {'anon':>9} {'file':>9}")
    for arm, m in results["rss_kib"]["arms"].items():
        i, a = m["idle"], m["after"]
        print(f"{arm:14} {i['total']:9} {i['anon']:9} {i['file']:9}   {a['total']:9} {a['anon']:9} {a['file']:9}")
    print(f"audit records dropped (queue full) over the whole run: {results['audit_dropped']}")
    if results.get("streams"):
        print("\nconcurrent streams: peak RssAnon / RssFile of the proxy, KiB; streams complete")
        bare = results["streams"].get("bare", {})
        for arm, by_n in results["streams"].items():
            for n, r in by_n.items():
                vs = f"  anon vs bare {r['peak']['anon'] / bare[n]['peak']['anon']:.2f}x" if arm != "bare" and n in bare else ""
                print(f"  {arm:14} {n:5}: {r['peak']['anon']:8} / {r['peak']['file']:7}  {r['complete']}/{n}{vs}")

    def med(scenario, arm, key="rps"):
        rs = results.get(scenario, {}).get(arm)
        vals = [r[key] for r in rs or [] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    print("\nratios (medians of the same run)")
    for scenario in ("small", "large", "stream"):
        bare = med(scenario, "bare")
        for arm in ("collie", "collie-nohash", "collie-noaudit", "collie-pg"):
            v = med(scenario, arm)
            if v and bare:
                print(f"{scenario:8} {arm:14} / bare pingora: {v / bare:.2f}x req/s")
    for scenario in ("small", "large", "stream"):
        litellm = med(scenario, "litellm")
        if not litellm:
            continue
        cpu = med(scenario, "litellm", "cpu_us")
        rs = results[scenario]["litellm"]
        print(f"{scenario:8} litellm       : {litellm:.0f} req/s, CPU {cpu:.1f} µs/request, "
              f"errors {sum(r['errors'] for r in rs)}{error_kinds(rs)}")
        for arm in ("collie", "collie-nohash", "collie-noaudit", "collie-pg"):
            v = med(scenario, arm)
            if v:
                print(f"{scenario:8} {arm:14} / litellm: {v / litellm:.2f}x req/s, "
                      f"{cpu / med(scenario, arm, 'cpu_us'):.1f}x less CPU per request")
    for scenario in ("small", "large", "stream", "tenants"):
        off = med(scenario, "collie-noaudit")
        for arm, sink in (("collie", "sqlite"), ("collie-nohash", "sqlite, no hash index"), ("collie-pg", "postgres")):
            on = med(scenario, arm)
            if on and off:
                print(f"{scenario:8} audit to {sink:21}: {on / off:.3f}x the req/s of audit off "
                      f"({1 - on / off:+.1%} cost), CPU {med(scenario, arm, 'cpu_us') - med(scenario, 'collie-noaudit', 'cpu_us'):+.1f} µs/request")
    for arm in ("collie", "collie-nohash", "collie-noaudit", "collie-pg"):
        core, many = med("small", arm), med("tenants", arm)
        if core and many:
            print(f"1,000 tenants (Zipf) vs one tenant, {arm:14}: {many / core:.2f}x req/s, "
                  f"p50 {med('tenants', arm, 'p50_us') - med('small', arm, 'p50_us'):+.0f} µs, "
                  f"p99 {med('tenants', arm, 'p99_us') - med('small', arm, 'p99_us'):+.0f} µs at 1,000 req/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
