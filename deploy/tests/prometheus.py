#!/usr/bin/env python3
"""A real Prometheus scraping a real Collie.

Starts two `collie mock` providers (one answering, one always 503), a
`collie run` in front of them, and Debian's `prometheus` with the shipped
scrape configuration (deploy/prometheus/prometheus.yml, its static target
moved to this test's admin port, a 1 s interval, storage in a temporary
directory) plus the annotation-based pod job of kubernetes-scrape.yaml, its
discovery replaced by a static target that carries the pod labels Kubernetes
discovery would. Sends traffic of every kind (success, stream, fallback,
refusals, queueing, an upstream failure, unreported usage), then checks:

- promtool check config (the shipped file and the test's), check rules,
  test rules, check metrics on Collie's /metrics;
- every scrape target is up, the annotation job's relabelling gave one target
  with its pod labels;
- every rule evaluates without error, and the alerts this traffic must raise
  are pending or firing;
- every query of every panel in deploy/grafana/collie.json, sent through
  /api/v1/query, returns at least one series with a number.

Exits non-zero on any failure and stops everything it started.
Usage: deploy/tests/prometheus.py --collie target/release/collie"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.normpath(os.path.join(HERE, ".."))
PROM_DIR = os.path.join(DEPLOY, "prometheus")
DASHBOARD = os.path.join(DEPLOY, "grafana", "collie.json")
# Alerts the traffic below must raise (pending or firing).
EXPECTED_ALERTS = {
    "CollieTenantOverBudget",  # capped: day.requests spent
    "CollieUpstreamErrorRatioHigh",  # down-steady answers 503
    "CollieFallbackRateHigh",  # requests fell back to the steady pool
    "CollieAnomalyDetected",  # team-a over the request_rate anomaly limit
}
# Alerts it must not raise.
QUIET_ALERTS = {
    "CollieAuditRecordsDropped",
    "CollieAuditWriteErrors",
    "CollieNoHealthyDeployment",
    "CollieAlertsCritical",  # the only alert this traffic raises is a warning
    "CollieConfigReloadFailed",  # no reload at all
}
# Values for the dashboard's variables and Grafana's interval macros.
SUBSTITUTIONS = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
    "$job": ".*",
    "$instance": ".*",
    "$tenant": ".*",
}

TENANT_KEYS = {"team-a": "sk-test-team-a", "capped": "sk-test-capped"}

CONFIG = """\
listen: 127.0.0.1:{gateway}
admin_listen: 127.0.0.1:{admin}
quota:
  defaults: {{ rpm: 6000, tpm: 10000000, requests_per_day: 100000, default_max_tokens: 256 }}
audit:
  sink: sqlite
  sqlite_path: {tmp}/audit.db
  flush_interval: 50ms
  anomalies: {{ window: 1m, tenant_requests: 10 }}
tenants:
  - id: team-a
    api_keys: ["{key_a}"]
    models: ["*"]
    priority: 1
  - id: capped
    api_keys: ["{key_capped}"]
    models: ["*"]
    priority: 5
    quota: {{ requests_per_day: 3 }}
models:
  - name: gpt-4o-mini
    fallback: [flaky, steady]
pools:
  - id: flaky
    deployments: [{{ deployment: down-mini }}, {{ deployment: down-steady }}]
  - id: steady
    deployments: [{{ deployment: ok-mini }}]
    max_concurrency: 2
deployments:
  - id: down-mini
    base_url: http://127.0.0.1:{mock_down}/v1
    api_key_env: COLLIE_TEST_PROVIDER_KEY
    model: gpt-4o-mini-2024-07-18
    # Judged by live traffic only: the first requests reach it and fall back.
    health: {{ probe: "off", failures_to_open: 3, cooldown: 1s, max_cooldown: 2s }}
  - id: down-steady
    base_url: http://127.0.0.1:{mock_down}/v1
    api_key_env: COLLIE_TEST_PROVIDER_KEY
    model: gpt-4o-mini-2024-07-18
    # Its breaker never opens: every request that picks it fails over.
    health: {{ probe: "off", failures_to_open: 100000, min_samples: 100000 }}
  - id: ok-mini
    base_url: http://127.0.0.1:{mock_ok}/v1
    api_key_env: COLLIE_TEST_PROVIDER_KEY
    model: gpt-4.1-mini
    health: {{ probe: models, interval: 1s }}
pricing:
  gpt-4o-mini-2024-07-18: {{ input_per_mtok: 0.15, output_per_mtok: 0.60 }}
  gpt-4.1-mini: {{ input_per_mtok: 0.40, output_per_mtok: 1.60 }}
"""

failures = []


def check(ok, msg):
    if not ok:
        failures.append(msg)
        print(f"FAIL {msg}", file=sys.stderr, flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30, want=200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == want:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    print(f"$ {' '.join(cmd)}  → exit {out.returncode}", flush=True)
    text = (out.stdout + out.stderr).strip()
    if text:
        print("  " + text.replace("\n", "\n  "), flush=True)
    return out


class Procs:
    """Everything the test starts, stopped by pid in reverse order."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, cmd, env=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def stop(self):
        for name, p, log in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop on SIGTERM; killing it", file=sys.stderr)
                    p.kill()
                    p.wait()
            log.close()


def request(gateway, tenant, key, body, headers=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{gateway}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Tenant-ID": tenant, "Authorization": f"Bearer {key}", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def traffic(gateway):
    """One wave of every kind of request; returns the statuses seen per kind."""
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
    seen = {}

    def note(kind, status):
        seen.setdefault(kind, []).append(status)

    a = ("team-a", TENANT_KEYS["team-a"])
    for _ in range(4):
        note("chat", request(gateway, *a, chat)[0])
    for _ in range(2):
        note("stream", request(gateway, *a, {**chat, "stream": True})[0])
    note("no_usage", request(gateway, *a, chat, {"x-mock-no-usage": "1"})[0])
    note("upstream_503", request(gateway, *a, chat, {"x-mock-status": "503"})[0])
    note("bad_key", request(gateway, "team-a", "sk-wrong", chat)[0])
    for _ in range(3):
        note("capped", request(gateway, "capped", TENANT_KEYS["capped"], chat)[0])
    # Six at once on a pool that admits two: four of them queue.
    threads = [
        threading.Thread(target=lambda: note("queued", request(gateway, *a, chat, {"x-mock-delay-ms": "300"})[0]))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def prom_query(prom, expr):
    url = f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        data = json.load(r)
    if data.get("status") != "success":
        raise RuntimeError(f"{expr}: {data}")
    return data["data"]["result"]


def prom_get(prom, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{prom}{path}", timeout=10) as r:
        return json.load(r)["data"]


def finite(result):
    return [s for s in result if not math.isnan(float(s["value"][1])) and not math.isinf(float(s["value"][1]))]


def hash_key(collie, key):
    return subprocess.run([collie, "hash-key", key], capture_output=True, text=True, check=True).stdout.strip()


def prometheus_config(tmp, admin):
    """The shipped config, pointed at this test's Collie, plus the pod job."""
    with open(os.path.join(PROM_DIR, "prometheus.yml")) as f:
        conf = yaml.safe_load(f)
    conf["global"]["scrape_interval"] = "1s"
    conf["global"]["evaluation_interval"] = "1s"
    conf["rule_files"] = [os.path.join(PROM_DIR, r) for r in conf["rule_files"]]
    (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "collie"]
    (static,) = job["static_configs"]
    check(static["targets"] == ["127.0.0.1:9090"], f"prometheus.yml: unexpected static targets {static['targets']}")
    static["targets"] = [f"127.0.0.1:{admin}"]
    with open(os.path.join(PROM_DIR, "kubernetes-scrape.yaml")) as f:
        (pods,) = yaml.safe_load(f)["scrape_configs"]
    pods["job_name"] = "collie-pods"
    del pods["kubernetes_sd_configs"]
    # What pod discovery gives for the example pod: one target per container
    # port (Collie's admin port, a port-less application container), with the
    # pod's annotations and labels. The relabelling must make them one
    # target on the annotated port.
    meta = {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(admin),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        "__meta_kubernetes_namespace": "chat",
        "__meta_kubernetes_pod_name": "chat-app-7c9d-x2k4q",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "chat-app",
    }
    ignored = {**meta, "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "false", "__meta_kubernetes_pod_name": "other"}
    pods["static_configs"] = [
        {"targets": [f"127.0.0.1:{admin}", "127.0.0.1"], "labels": meta},
        {"targets": [f"127.0.0.1:{admin}"], "labels": ignored},
    ]
    conf["scrape_configs"].append(pods)
    path = os.path.join(tmp, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(conf, f, sort_keys=False)
    return path


def dashboard_queries():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for p in dash["panels"]:
        for sub in [p] + p.get("panels", []):
            for t in sub.get("targets", []):
                out.append((sub["title"], t["refId"], t["expr"]))
    return out


def substitute(expr):
    for k in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(k, SUBSTITUTIONS[k])
    left = re.findall(r"\$\w+", expr)
    check(not left, f"dashboard query has variables the test does not know: {left}")
    return expr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--collie", required=True)
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    ap.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    args = ap.parse_args()
    collie = os.path.abspath(args.collie)
    started = time.time()

    tmp = tempfile.mkdtemp(prefix="collie-prom-")
    procs = Procs(tmp)
    try:
        ports = {k: free_port() for k in ("gateway", "admin", "mock_ok", "mock_down", "prom")}
        conf_path = os.path.join(tmp, "collie.yaml")
        with open(conf_path, "w") as f:
            f.write(CONFIG.format(tmp=tmp, key_a=hash_key(collie, TENANT_KEYS["team-a"]),
                                  key_capped=hash_key(collie, TENANT_KEYS["capped"]), **ports))
        procs.start("mock-ok", [collie, "mock", "--listen", f"127.0.0.1:{ports['mock_ok']}"])
        procs.start("mock-down", [collie, "mock", "--listen", f"127.0.0.1:{ports['mock_down']}", "--status", "503"])
        env = {**os.environ, "COLLIE_TEST_PROVIDER_KEY": "x", "RUST_LOG": "warn"}
        procs.start("collie", [collie, "run", "--config", conf_path], env=env)
        if not check(wait_http(f"http://127.0.0.1:{ports['admin']}/readyz"), "collie did not become ready"):
            return

        prom_conf = prometheus_config(tmp, ports["admin"])
        check(run([args.promtool, "check", "config", os.path.join(PROM_DIR, "prometheus.yml")]).returncode == 0,
              "promtool check config deploy/prometheus/prometheus.yml")
        check(run([args.promtool, "check", "config", prom_conf]).returncode == 0, "promtool check config (test config)")
        check(run([args.promtool, "check", "rules", os.path.join(PROM_DIR, "collie-rules.yaml")]).returncode == 0,
              "promtool check rules")
        tests = sorted(f for f in os.listdir(PROM_DIR) if ".test." in f)
        check(bool(tests), "no rule tests in deploy/prometheus")
        for t in tests:
            check(run([args.promtool, "test", "rules", t], cwd=PROM_DIR).returncode == 0, f"promtool test rules {t}")

        procs.start("prometheus", [
            args.prometheus, f"--config.file={prom_conf}", f"--storage.tsdb.path={tmp}/tsdb",
            f"--web.listen-address=127.0.0.1:{ports['prom']}", "--log.level=warn",
        ])
        if not check(wait_http(f"http://127.0.0.1:{ports['prom']}/-/ready", timeout=60), "prometheus did not become ready"):
            return

        # Prometheus hands targets to its scrapers a few seconds after start:
        # wait for the first scrape of every target, or the traffic below
        # would all land before it and no counter would move in a window.
        deadline = time.time() + 30
        while time.time() < deadline:
            targets = prom_get(ports["prom"], "/api/v1/targets")["activeTargets"]
            if len(targets) >= 2 and all(t["health"] == "up" for t in targets):
                break
            time.sleep(0.5)
        check(time.time() < deadline, "prometheus did not scrape every target within 30 s")
        # Two waves, scraped in between, so that counters move within the
        # dashboard's rate windows.
        seen = traffic(ports["gateway"])
        time.sleep(3)
        for kind, statuses in traffic(ports["gateway"]).items():
            seen[kind] += statuses
        print(f"traffic: {json.dumps(seen, sort_keys=True)}", flush=True)
        check(all(s == 200 for k in ("chat", "stream", "no_usage", "queued") for s in seen[k]), "successful requests failed")
        check(seen["upstream_503"] and all(s == 503 for s in seen["upstream_503"]), "the failing request did not get 503")
        check(all(s == 401 for s in seen["bad_key"]), "a wrong key was not refused with 401")
        check(seen["capped"].count(429) == 3, f"capped tenant: expected 3 requests admitted and 3 refused, got {seen['capped']}")

        with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/metrics", timeout=5) as r:
            metrics_text = r.read()
        with open(os.path.join(tmp, "metrics.txt"), "wb") as f:
            f.write(metrics_text)
        out = subprocess.run([args.promtool, "check", "metrics"], input=metrics_text, capture_output=True)
        print(f"$ promtool check metrics < /metrics  → exit {out.returncode}", flush=True)
        problems = (out.stdout + out.stderr).decode().strip()
        check(out.returncode == 0 and not problems, f"promtool check metrics: {problems}")

        time.sleep(5)  # a few scrapes and rule evaluations after the traffic

        targets = prom_get(ports["prom"], "/api/v1/targets")["activeTargets"]
        for t in targets:
            check(t["health"] == "up", f"target {t['scrapePool']} {t['scrapeUrl']} is {t['health']}: {t.get('lastError')}")
        pods = [t for t in targets if t["scrapePool"] == "collie-pods"]
        check(len(pods) == 1, f"the pod job should collapse to one target, has {len(pods)}")
        for t in pods:
            labels = t["labels"]
            check(labels.get("namespace") == "chat" and labels.get("pod") == "chat-app-7c9d-x2k4q" and labels.get("app") == "chat-app",
                  f"pod job labels: {labels}")
            check(labels.get("instance") == f"127.0.0.1:{ports['admin']}", f"pod job address: {labels}")

        for expr in ('collie_requests_total{job="collie"}', 'collie_requests_total{job="collie-pods"}',
                     'collie_fallbacks_total{outcome="served"}', 'collie_quota_refusals_total{tenant="capped",window="day.requests"}',
                     'gen_ai_server_time_to_first_token_seconds_count', 'collie_usage_unknown_total',
                     'collie_queue_wait_seconds_count', 'collie_anomalies_total{rule="request_rate"}'):
            check(bool(prom_query(ports["prom"], expr)), f"Prometheus has no series for {expr}")

        groups = prom_get(ports["prom"], "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        check(len(rules) > 0, "Prometheus loaded no rules")
        for r in rules:
            check(r.get("health") == "ok", f"rule {r['name']}: {r.get('health')} {r.get('lastError', '')}")
        active = {a["labels"]["alertname"]: a["state"] for a in prom_get(ports["prom"], "/api/v1/alerts")["alerts"]}
        print(f"alerts: {json.dumps(active, sort_keys=True)}", flush=True)
        for name in sorted(EXPECTED_ALERTS):
            check(name in active, f"alert {name} should be pending or firing")
        for name in sorted(QUIET_ALERTS):
            check(name not in active, f"alert {name} should be quiet ({active.get(name)})")

        queries = dashboard_queries()
        empty = 0
        for title, ref, expr in queries:
            result = prom_query(ports["prom"], substitute(expr))
            numbers = finite(result)
            if not check(bool(numbers), f"dashboard panel '{title}' query {ref} returned {len(result)} series, none with a number: {substitute(expr)}"):
                empty += 1
        print(f"dashboard: {len(queries) - empty} of {len(queries)} panel queries returned data", flush=True)
    finally:
        procs.stop()
        if failures:
            print(f"logs and data kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"prometheus test: {time.time() - started:.0f} s", flush=True)
    if failures:
        print(f"{len(failures)} failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
