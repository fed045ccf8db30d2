"""Checks of the Helm chart in helm/token-broker, run by tests/it/chart.rs.

Uses helm-python-sdk (Helm's Go SDK, offline): lint (values.schema.json included, and the YAML
of every rendered manifest) and render, for a chosen Kubernetes version (`.Capabilities`, which
`sidecar.mode: auto` reads). Rendered manifests are parsed with the SDK's own YAML reader, the
config file with tomllib. Every rendering (defaults, ci/example-values.yaml, the parent chart and
the two-alias parent, in native and plain modes) is validated with kubernetes-validate --strict
against the schemas of Kubernetes 1.29 and 1.31, and checked for what the API server refuses
beyond the schemas (restartPolicy on a regular container, probes on a plain init container,
duplicate container names and ports, mounts of missing volumes, duplicate object names...).
CRDs (PodMonitor) are checked structurally. The `store` values (the config's own `[store]` field
names) are checked to render verbatim into `[store]` and, minus the sidecar-only fields, into the
migration Job's config; the chart's old camelCase names and unknown keys are refused. Exits 1 listing every failed check. Prints no secret
values: the values used here hold only names of variables, Secrets and keys.

    python tests/chart/check_chart.py [REPO_ROOT] [--emit-configs DIR]

Tree mode (ci/tree-values.yaml, with the broker as a DaemonSet and as a Deployment, and
variants): the broker's and the follower sidecar's ConfigMaps are parsed with tomllib and every
TLS file path of either config is resolved through the container's volume mounts to the Secret
key that provides it; the broker Service's name and port are what the followers' addresses
name, and the DaemonSet's Service keeps traffic on the node (internalTrafficPolicy Local).

With --emit-configs, the rendered config.toml of the default values, of ci/example-values.yaml,
of the parent chart and of the parent chart in plain mode are written to DIR (defaults.toml,
example.toml, parent.toml, plain.toml) for `token-broker check-config`; so are tree mode's
broker and follower configs (broker.toml, follower.toml).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import sys
import tempfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same module from PyPI (scripts/py-env)
    import tomli as tomllib
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
from helm_python import _native

ARGS = sys.argv[1:]
EMIT: Path | None = None
if "--emit-configs" in ARGS:
    i = ARGS.index("--emit-configs")
    EMIT = Path(ARGS[i + 1])
    del ARGS[i : i + 2]
ROOT = Path(ARGS[0] if ARGS else Path(__file__).resolve().parents[2])
CHART = ROOT / "helm" / "token-broker"
PARENT = ROOT / "tests" / "chart" / "parent"
TWO_ALIASES = ROOT / "tests" / "chart" / "two-aliases"
EXAMPLE_VALUES = CHART / "ci" / "example-values.yaml"
TREE_VALUES = CHART / "ci" / "tree-values.yaml"

# The versions every rendering is validated against (native sidecars need 1.29), and one before.
KUBE_VERSIONS = ("1.29.0", "1.31.0")
OLD_KUBE = "1.28.0"
IMAGE = "ghcr.io/token-broker/token-broker:0.1.0"
BINARY = "/usr/local/bin/token-broker"
CONFIG_PATH = "/etc/token-broker/config.toml"
SERVE_ARGS = ["serve", "--config", CONFIG_PATH]
SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Field names that would hold a secret inline (the broker refuses them; the chart must never
# produce them).
INLINE_SECRET_FIELDS = {"client_secret", "refresh_token", "database_url", "encryption_key", "password"}

failures: list[str] = []
checks = 0


def check(cond: bool, what: str) -> None:
    global checks
    checks += 1
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}")


def section(name: str) -> None:
    print(f"== {name}")


def load_values(path: Path) -> dict[str, Any]:
    return helm.values_from_yaml(path.read_text())


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def lint(path: Path, values: dict[str, Any] | None, label: str, **kw: Any) -> dict[str, Any]:
    report = helm.lint(path, values, strict=True, **kw)
    return report


def lint_ok(path: Path, values: dict[str, Any] | None, label: str, **kw: Any) -> None:
    report = lint(path, values, label, **kw)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    check(not report["errors"] and not bad, f"{label}: lint is clean, got {report['errors'] or bad}")


def without_schema(tmp: str) -> Path:
    """A copy of the chart without values.schema.json: what `--skip-schema-validation` renders,
    to reach the checks the templates make themselves."""
    dst = Path(tmp) / "token-broker"
    shutil.copytree(CHART, dst)
    (dst / "values.schema.json").unlink()
    return dst


def render(path: Path, values: dict[str, Any] | None, kube: str = KUBE_VERSIONS[-1]) -> dict[str, str]:
    """Render as `helm template --kube-version` would. helm-python-sdk's Chart.render does not
    expose the C SDK's kube_version option, so the native call is made with it directly."""
    opts = {"name": "rel", "namespace": "ns", "is_install": True, "kube_version": f"v{kube}"}
    with helm.Chart.load(path) as chart:
        raw = _native.call_string("helm_render", chart._raw(), json.dumps(values) if values is not None else None, json.dumps(opts))
    return json.loads(raw)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every rendered object, parsed (NOTES.txt left out)."""
    out = []
    for name, text in sorted(manifests.items()):
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in re.split(r"(?m)^---\s*$", text):
            body = "\n".join(l for l in doc.splitlines() if l.strip() and not l.lstrip().startswith("#"))
            if not body:
                continue
            try:
                obj = helm.values_from_yaml(doc)
            except helm.HelmError as e:
                check(False, f"{name}: rendered YAML parses ({e})")
                continue
            obj["__template"] = name
            out.append(obj)
    return out


def find(objs: list[dict[str, Any]], kind: str, pred: Callable[[dict[str, Any]], bool] = lambda o: True) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind and pred(o)]


def one(objs: list[dict[str, Any]], kind: str, what: str, pred: Callable[[dict[str, Any]], bool] = lambda o: True) -> dict[str, Any]:
    found = find(objs, kind, pred)
    check(len(found) == 1, f"{what}: exactly one {kind}, found {len(found)}")
    return found[0] if found else {}


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found = [c for c in pod.get(key) or [] if c.get("name") == name]
    check(len(found) == 1, f"pod has {key} entry {name!r}")
    return found[0] if found else {}


def is_hook(o: dict[str, Any]) -> bool:
    return "helm.sh/hook" in ((o.get("metadata") or {}).get("annotations") or {})


def regular_configmap(objs: list[dict[str, Any]], what: str) -> dict[str, Any]:
    return one(objs, "ConfigMap", what, lambda o: not is_hook(o))


def emit(cm: dict[str, Any], name: str) -> None:
    if EMIT is not None:
        EMIT.mkdir(parents=True, exist_ok=True)
        (EMIT / name).write_text((cm.get("data") or {}).get("config.toml", ""))


def parse_toml(cm: dict[str, Any], what: str) -> dict[str, Any]:
    text = (cm.get("data") or {}).get("config.toml", "")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        check(False, f"{what}: config.toml is valid TOML ({e})")
        return {}


def walk_keys(value: Any, path: str = "") -> list[tuple[str, str, Any]]:
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((path, k, v))
            out.extend(walk_keys(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(walk_keys(v, f"{path}[{i}]"))
    return out


def expect_error(values: dict[str, Any] | None, needles: list[str], label: str, path: Path = CHART, schema: bool = True, kube: str = KUBE_VERSIONS[-1]) -> None:
    """Render must raise naming every needle; so must lint for schema errors (lint only logs a
    template's `fail`: Helm's lint mode makes `fail` and `required` lenient)."""
    if schema:
        report = lint(path, values, label, with_subcharts=True)
        lint_text = "\n".join(report["errors"])
        check(bool(report["errors"]), f"{label}: lint reports an error")
        for n in needles:
            check(n in lint_text, f"{label}: lint error names {n!r}, got {lint_text!r}")
    try:
        render(path, values, kube)
        check(False, f"{label}: render fails")
    except helm.HelmError as e:
        for n in needles:
            check(n in str(e), f"{label}: render error names {n!r}, got {str(e)!r}")


def check_sidecar(c: dict[str, Any], what: str, admin_port: int = 9464, probe_type: str = "grpc", native: bool = True, addr: str = "127.0.0.1:50051", wait: bool = True) -> None:
    check(c.get("image") == IMAGE, f"{what}: image {IMAGE}, got {c.get('image')}")
    check(c.get("args") == SERVE_ARGS, f"{what}: args {SERVE_ARGS}, got {c.get('args')}")
    check(c.get("securityContext") == SECURITY_CONTEXT, f"{what}: restrictive securityContext, got {c.get('securityContext')}")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    check(ports.get("tb-admin") == admin_port, f"{what}: admin container port {admin_port}, got {ports}")
    live, ready, start = c.get("livenessProbe") or {}, c.get("readinessProbe") or {}, c.get("startupProbe") or {}
    if probe_type == "grpc":
        check(live.get("grpc") == {"port": admin_port, "service": "liveness"}, f"{what}: liveness is grpc {admin_port} service liveness, got {live}")
        check(ready.get("grpc", {}).get("port") == admin_port and ready["grpc"].get("service", "") == "", f"{what}: readiness is grpc {admin_port} service '', got {ready}")
        check("httpGet" not in live and "httpGet" not in ready, f"{what}: no http probes with type grpc")
    else:
        check(live.get("httpGet") == {"path": "/livez", "port": admin_port}, f"{what}: liveness GET /livez on {admin_port}, got {live}")
        check(ready.get("httpGet") == {"path": "/readyz", "port": admin_port}, f"{what}: readiness GET /readyz on {admin_port}, got {ready}")
        check("grpc" not in live and "grpc" not in ready, f"{what}: no grpc probes with type http")
    handler = lambda p: {k: v for k, v in p.items() if k in ("grpc", "httpGet")}
    if native:
        # The application's containers start once the startup probe passes: on readiness, which
        # waits for the required collections (gRPC service "", what the binary reports).
        check(handler(start) == handler(ready) and start, f"{what}: native startup probe is the readiness check, got {start}")
        check(c.get("restartPolicy") == "Always", f"{what}: native sidecar has restartPolicy Always, got {c.get('restartPolicy')!r}")
        check("lifecycle" not in c, f"{what}: native sidecar needs no postStart wait, got {c.get('lifecycle')}")
    else:
        check(handler(start) == handler(live) and start, f"{what}: plain startup probe is the liveness check, got {start}")
        check("restartPolicy" not in c, f"{what}: plain sidecar has no restartPolicy")
        post = ((c.get("lifecycle") or {}).get("postStart") or {}).get("exec", {}).get("command")
        want = [BINARY, "wait", "--addr", addr, "--timeout", "60s"] if wait else None
        check(post == want, f"{what}: plain sidecar postStart {want}, got {post}")
    for name, p in (("liveness", live), ("readiness", ready), ("startup", start)):
        check(isinstance(p.get("periodSeconds"), int) and p.get("timeoutSeconds", 0) >= 1, f"{what}: {name} probe has timings, got {p}")
    res = c.get("resources") or {}
    check(bool(res.get("requests")) and bool((res.get("limits") or {}).get("memory")), f"{what}: resources set, got {res}")
    mounts = {m.get("name"): m for m in c.get("volumeMounts") or []}
    cfg = mounts.get("token-broker-config") or {}
    check(cfg.get("mountPath") == "/etc/token-broker" and cfg.get("readOnly") is True, f"{what}: config mounted read-only at /etc/token-broker, got {cfg}")


def secret_env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env") or [] if "valueFrom" in e}


def pod_annotations(dep: dict[str, Any]) -> dict[str, str]:
    return ((dep.get("spec", {}).get("template", {}).get("metadata") or {}).get("annotations")) or {}


def check_annotations(dep: dict[str, Any], cm: dict[str, Any], what: str, port: int = 9464) -> None:
    ann = pod_annotations(dep)
    check(ann.get("prometheus.io/scrape") == "true", f"{what}: prometheus.io/scrape 'true', got {ann}")
    check(ann.get("prometheus.io/port") == str(port), f"{what}: prometheus.io/port '{port}', got {ann}")
    check(ann.get("prometheus.io/path") == "/metrics", f"{what}: prometheus.io/path /metrics, got {ann}")
    text = (cm.get("data") or {}).get("config.toml", "")
    digest = hashlib.sha256(text.encode()).hexdigest()
    check(ann.get("checksum/token-broker-config") == digest, f"{what}: config checksum annotation is the sha256 of the ConfigMap's config.toml")


def check_no_inline_secrets(cfg: dict[str, Any], what: str) -> None:
    for path, key, value in walk_keys(cfg):
        check(key not in INLINE_SECRET_FIELDS, f"{what}: no inline secret field {path}.{key} in the config")
        if key.endswith("_env"):
            check(isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) is not None, f"{what}: {path}.{key} names a variable")


# ------------------------------------------------------------------------------------------
# What the API server would refuse. kubernetes-validate checks the OpenAPI schemas; the rules
# below are the ones it cannot see (they live in the API server's validation code).

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def pod_template(o: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template (metadata + spec) of a workload object, or None."""
    kind, spec = o.get("kind"), o.get("spec") or {}
    if kind == "Pod":
        return {"metadata": o.get("metadata") or {}, "spec": spec}
    if kind == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return spec.get("template") if kind in WORKLOAD_KINDS else None


def is_job_pod(o: dict[str, Any]) -> bool:
    return o.get("kind") in ("Job", "CronJob")


def is_broker(c: dict[str, Any]) -> bool:
    return (c.get("args") or [None])[0] == "serve" and "token-broker" in str(c.get("image"))


def check_probe(p: dict[str, Any], c: dict[str, Any], kind: str, what: str) -> None:
    handlers = [h for h in PROBE_HANDLERS if h in p]
    check(len(handlers) == 1, f"{what}: {kind} has exactly one handler, got {handlers}")
    if kind in ("livenessProbe", "startupProbe"):
        check(p.get("successThreshold", 1) == 1, f"{what}: {kind} successThreshold must be 1 (API server), got {p.get('successThreshold')}")
    port = (p.get(handlers[0]) or {}).get("port") if handlers and handlers[0] != "exec" else None
    declared = {q.get("containerPort") for q in c.get("ports") or []} | {q.get("name") for q in c.get("ports") or []}
    if port is not None:
        check(port in declared, f"{what}: {kind} port {port} is one of the container's ports {sorted(map(str, declared))}")


def check_pod(o: dict[str, Any], what: str) -> None:
    """The pod rules of the API server (1.29-1.31) that the schemas do not express."""
    spec = (pod_template(o) or {}).get("spec") or {}
    inits, mains = spec.get("initContainers") or [], spec.get("containers") or []
    check(bool(mains), f"{what}: at least one container")
    names = [c.get("name") for c in inits + mains]
    check(len(names) == len(set(names)), f"{what}: container names unique across init and regular containers, got {names}")
    for c in mains:
        cw = f"{what} container {c.get('name')}"
        # "spec.containers[0].restartPolicy: Forbidden: may not be set for non-init containers"
        check("restartPolicy" not in c, f"{cw}: no restartPolicy on a regular container (the API server refuses it), got {c.get('restartPolicy')!r}")
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            if kind in c:
                check_probe(c[kind], c, kind, cw)
    for c in inits:
        cw = f"{what} init container {c.get('name')}"
        rp = c.get("restartPolicy")
        check(rp in (None, "Always"), f"{cw}: restartPolicy absent or Always, got {rp!r}")
        if rp == "Always":
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                if kind in c:
                    check_probe(c[kind], c, kind, cw)
        else:
            bad = [k for k in ("lifecycle", "livenessProbe", "readinessProbe", "startupProbe") if k in c]
            check(not bad, f"{cw}: no lifecycle or probes on an init container without restartPolicy Always, got {bad}")
    ports = [(p.get("containerPort"), p.get("protocol", "TCP")) for c in inits + mains for p in c.get("ports") or []]
    check(len(ports) == len(set(ports)), f"{what}: no container port declared twice in the pod, got {ports}")
    pnames = [p["name"] for c in inits + mains for p in c.get("ports") or [] if "name" in p]
    check(len(pnames) == len(set(pnames)), f"{what}: port names unique in the pod, got {pnames}")
    for n in pnames:
        check(len(n) <= 15 and DNS_LABEL.fullmatch(n) is not None and re.search("[a-z]", n) is not None, f"{what}: port name {n!r} is an IANA_SVC_NAME")
    vols = [v.get("name") for v in spec.get("volumes") or []]
    check(len(vols) == len(set(vols)), f"{what}: volume names unique, got {vols}")
    for c in inits + mains:
        for m in c.get("volumeMounts") or []:
            check(m.get("name") in vols, f"{what} container {c.get('name')}: mount {m.get('name')!r} names a volume of the pod {vols}")
        for h in ((c.get("lifecycle") or {}).get("postStart") or {}, (c.get("lifecycle") or {}).get("preStop") or {}):
            cmd = (h.get("exec") or {}).get("command") or []
            if cmd and is_broker(c):
                check(cmd[0] == BINARY, f"{what}: the broker's hooks exec the binary (distroless: no shell), got {cmd}")
    if is_job_pod(o):
        check(spec.get("restartPolicy") in ("Never", "OnFailure"), f"{what}: a Job's pod has restartPolicy Never or OnFailure, got {spec.get('restartPolicy')}")
        check(not any(is_broker(c) for c in mains), f"{what}: no plain broker sidecar in a Job's pod (it never exits, so the Job never completes)")


def check_pod_monitor(pm: dict[str, Any], pods: list[dict[str, Any]], what: str, expect_pods: bool) -> None:
    """The shape the Prometheus Operator's CRD requires, and a port the selected pods have."""
    check(pm.get("apiVersion") == "monitoring.coreos.com/v1" and pm.get("kind") == "PodMonitor", f"{what}: monitoring.coreos.com/v1 PodMonitor, got {pm.get('apiVersion')} {pm.get('kind')}")
    name = (pm.get("metadata") or {}).get("name", "")
    check(DNS_LABEL.fullmatch(name) is not None and len(name) <= 63, f"{what}: a valid name, got {name!r}")
    spec = pm.get("spec") or {}
    check(set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit"}, f"{what}: known spec fields, got {sorted(spec)}")
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    check(bool(match) and all(isinstance(v, str) for v in match.values()), f"{what}: selector.matchLabels of strings, got {match}")
    eps = spec.get("podMetricsEndpoints") or []
    check(bool(eps), f"{what}: podMetricsEndpoints not empty")
    for ep in eps:
        check(isinstance(ep.get("port"), str), f"{what}: endpoint scrapes a port by name, got {ep}")
        check(set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}, f"{what}: known endpoint fields, got {sorted(ep)}")
        for k in ("interval", "scrapeTimeout"):
            if k in ep:
                check(re.fullmatch(r"([0-9]+(ms|s|m|h))+", str(ep[k])) is not None, f"{what}: {k} is a Prometheus duration, got {ep[k]!r}")
        check(str(ep.get("path", "/")).startswith("/"), f"{what}: path starts with /")
    selected = [o for o in pods if match and all(((pod_template(o) or {}).get("metadata") or {}).get("labels", {}).get(k) == v for k, v in match.items())]
    if expect_pods:
        check(bool(selected), f"{what}: selects at least one rendered pod ({match})")
    for o in selected:
        spec_ = (pod_template(o) or {}).get("spec") or {}
        ports = {p.get("name") for c in (spec_.get("initContainers") or []) + (spec_.get("containers") or []) if is_broker(c) for p in c.get("ports") or []}
        for ep in eps:
            check(ep.get("port") in ports, f"{what}: port {ep.get('port')!r} is the admin port name of the broker in {o['metadata']['name']}, got {ports}")


def check_api(objs: list[dict[str, Any]], kube: str, what: str, expect_pods: bool = True) -> None:
    """Everything the API server of `kube` would refuse, as far as it can be known offline."""
    keys = [(o.get("kind"), (o.get("metadata") or {}).get("name")) for o in objs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    check(not dup, f"{what}: every object has its own kind and name, duplicates {dup}")
    pods = [o for o in objs if pod_template(o) is not None]
    for o in objs:
        ow = f"{what} [k8s {kube}] {o.get('kind')}/{(o.get('metadata') or {}).get('name')}"
        body = {k: v for k, v in o.items() if k != "__template"}
        if (o.get("apiVersion"), o.get("kind")) in CRD_KINDS:
            if o.get("kind") == "PodMonitor":
                check_pod_monitor(body, pods, ow, expect_pods)
            continue
        try:
            kubernetes_validate.validate(body, kube, strict=True)
            check(True, ow)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            check(False, f"{ow}: kubernetes-validate --strict: {getattr(e, 'message', e)}")
        name = (o.get("metadata") or {}).get("name", "")
        limit = 52 if o.get("kind") == "CronJob" else 63 if o.get("kind") in ("Job", "Deployment", "Service") else 253
        check(0 < len(name) <= limit, f"{ow}: name of at most {limit} characters")
        if pod_template(o) is not None:
            check_pod(o, ow)


def validate_all(path: Path, values: dict[str, Any] | None, what: str, expect_pods: bool = True, mode: str | None = None) -> None:
    """Render for each Kubernetes version of KUBE_VERSIONS and check it like the API server."""
    for kube in KUBE_VERSIONS:
        objs = objects(render(path, values, kube))
        check_api(objs, kube, what, expect_pods)
        if mode is not None:
            check(sidecar_placements(objs) <= {mode}, f"{what} [k8s {kube}]: every sidecar is {mode}, got {sidecar_placements(objs)}")


def sidecar_placements(objs: list[dict[str, Any]]) -> set[str]:
    out = set()
    for o in objs:
        spec = (pod_template(o) or {}).get("spec") or {}
        out |= {"native" for c in spec.get("initContainers") or [] if is_broker(c)}
        out |= {"plain" for c in spec.get("containers") or [] if is_broker(c)}
    return out


# ------------------------------------------------------------------------------------------

def defaults() -> None:
    section("default values")
    lint_ok(CHART, None, "defaults")
    for kube in (OLD_KUBE,) + KUBE_VERSIONS:
        lint_ok(CHART, None, f"defaults, k8s {kube}", kube_version=f"v{kube}")
    objs = objects(render(CHART, None))
    check(not find(objs, "Job") and not find(objs, "Deployment"), "defaults: no Job and no Deployment (example off, no store)")
    check(not find(objs, "Secret"), "defaults: the chart never renders a Secret")
    check(not find(objs, "PodMonitor"), "defaults: no PodMonitor unless asked")
    cm = regular_configmap(objs, "defaults")
    check(cm.get("metadata", {}).get("name") == "rel-token-broker", f"defaults: ConfigMap named rel-token-broker, got {cm.get('metadata')}")
    emit(cm, "defaults.toml")
    cfg = parse_toml(cm, "defaults")
    check(cfg.get("admin") == {"enabled": True, "listen": "0.0.0.0:9464"}, f"defaults: [admin] listen on 0.0.0.0:9464, got {cfg.get('admin')}")
    check(cfg.get("server", {}).get("listen") == "127.0.0.1:50051", f"defaults: token API on loopback, got {cfg.get('server')}")
    check("shutdown_delay" not in cfg.get("server", {}), f"defaults (native on 1.31): no shutdown_delay, got {cfg.get('server')}")
    check(cfg.get("collections", {}).get("demo", {}).get("source", {}).get("kind") == "demo", f"defaults: demo collection, got {cfg.get('collections')}")
    check("store" not in cfg, "defaults: no [store]")
    validate_all(CHART, None, "defaults")
    old = parse_toml(regular_configmap(objects(render(CHART, None, OLD_KUBE)), "defaults 1.28"), "defaults 1.28")
    check(old.get("server", {}).get("shutdown_delay") == "5s", f"defaults on 1.28 (auto: plain): shutdown_delay 5s, got {old.get('server')}")
    named = objects(render(CHART, {"nameOverride": "tb", "metrics": {"podMonitor": {"enabled": True}}}))
    check({o["metadata"]["name"] for o in named if o.get("kind") in ("ConfigMap", "PodMonitor")} == {"rel-tb"}, "nameOverride: objects named rel-tb")
    check_api(named, KUBE_VERSIONS[-1], "nameOverride + PodMonitor", expect_pods=False)


def example() -> None:
    section("ci/example-values.yaml")
    values = load_values(EXAMPLE_VALUES)
    lint_ok(CHART, values, "example")
    objs = objects(render(CHART, values))
    check(not find(objs, "Secret"), "example: the chart never renders a Secret")

    cm = regular_configmap(objs, "example")
    cm_name = cm.get("metadata", {}).get("name")
    emit(cm, "example.toml")
    cfg = parse_toml(cm, "example")
    check(cfg.get("admin", {}).get("listen") == "0.0.0.0:9464", f"example: [admin] listen 0.0.0.0:9464, got {cfg.get('admin')}")
    check(cfg.get("server", {}).get("listen") == "unix:/var/run/token-broker/broker.sock", f"example: token API on the socket, got {cfg.get('server')}")
    check(cfg.get("server", {}).get("request_timeout") == "10s", "example: [server] extra fields kept")
    cols = cfg.get("collections", {})
    check(set(cols) == {"partner-api", "report.v2"}, f"example: collections partner-api and report.v2 , got {sorted(cols)}")
    partner = cols.get("partner-api", {})
    check(partner.get("required") is True, "example: partner-api is required")
    check(partner.get("source", {}).get("client_secret_env") == "PARTNER_CLIENT_SECRET", "example: client secret by reference")
    check(partner.get("policy", {}).get("refresh_fraction") == 0.75, "example: floats stay floats")
    report = cols.get("report.v2", {}).get("source", {})
    check(report.get("json", {}).get("retries") == 3 and type(report["json"]["retries"]) is int, "example: integers stay integers in nested tables")
    check(report.get("json", {}).get("scopes") == ["read", "write"], "example: arrays rendered")
    check(report.get("headers") == {"X-Tenant": "acme"}, "example: nested header table")
    store = cfg.get("store", {})
    check(store.get("database_url_env") == "TOKEN_BROKER_DATABASE_URL" and store.get("encryption_key_env") == "TOKEN_BROKER_ENCRYPTION_KEY", f"example: [store] by reference, got {store}")
    check(store.get("pool_size") == 1 and type(store.get("pool_size")) is int, f"example: pool_size an integer, got {store.get('pool_size')!r}")
    check(store.get("migrate") is False, "example: migrate = false with the migration Job")
    check(store.get("query_timeout") == "2s" and store.get("poll_interval") == "30s", f"example: further store fields rendered under their own names, got {store}")
    check(set(store) == {"database_url_env", "encryption_key_env", "pool_size", "migrate", "query_timeout", "poll_interval"}, f"example: [store] holds the store values but enabled, plus migrate, got {sorted(store)}")
    check_no_inline_secrets(cfg, "example")

    dep = one(objs, "Deployment", "example")
    pod = dep.get("spec", {}).get("template", {}).get("spec", {})
    sidecar = container(pod, "token-broker", init=True)
    check_sidecar(sidecar, "example sidecar")
    env = secret_env(sidecar)
    expected = {"PARTNER_CLIENT_SECRET": "partner-client-secret", "TOKEN_BROKER_DATABASE_URL": "database-url", "TOKEN_BROKER_ENCRYPTION_KEY": "encryption-key"}
    for name, key in expected.items():
        ref = (env.get(name) or {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref == {"name": "token-broker-secrets", "key": key}, f"example: {name} from secretKeyRef token-broker-secrets/{key}, got {ref}")
        check("value" not in (env.get(name) or {}), f"example: {name} has no inline value")
    app = container(pod, "app")
    check(app.get("securityContext") == SECURITY_CONTEXT, "example: app container restricted too")
    app_env = {e["name"]: e.get("value") for e in app.get("env") or []}
    check(app_env.get("TOKEN_BROKER_ADDR") == "unix:/var/run/token-broker/broker.sock", f"example: app gets TOKEN_BROKER_ADDR, got {app_env}")
    check(app.get("args") == ["watch", "partner-api"], f"example: app watches the first collection, got {app.get('args')}")
    for c, label in ((sidecar, "sidecar"), (app, "app")):
        mounts = {m.get("name"): m.get("mountPath") for m in c.get("volumeMounts") or []}
        check(mounts.get("token-broker-socket") == "/var/run/token-broker", f"example: socket dir mounted in the {label}, got {mounts}")
    vols = {v.get("name"): v for v in pod.get("volumes") or []}
    check((vols.get("token-broker-config") or {}).get("configMap", {}).get("name") == cm_name, f"example: config volume is ConfigMap {cm_name}")
    check("emptyDir" in (vols.get("token-broker-socket") or {}), "example: socket volume is an emptyDir")
    check(pod.get("securityContext", {}).get("fsGroup") == 65532, "example: fsGroup 65532 so the app can use the socket")
    check(pod.get("automountServiceAccountToken") is False, "example: no service account token")
    check_annotations(dep, cm, "example")

    # The migration hook: least privilege.
    job = one(objs, "Job", "example")
    ann = job.get("metadata", {}).get("annotations", {})
    check(ann.get("helm.sh/hook") == "pre-install,pre-upgrade", f"job: pre-install,pre-upgrade hook, got {ann}")
    check("before-hook-creation" in ann.get("helm.sh/hook-delete-policy", ""), f"job: before-hook-creation delete policy, got {ann}")
    jspec = job.get("spec", {})
    check(isinstance(jspec.get("backoffLimit"), int) and isinstance(jspec.get("activeDeadlineSeconds"), int) and jspec["activeDeadlineSeconds"] > 0, f"job: backoffLimit and activeDeadlineSeconds set, got {jspec}")
    jtpl = jspec.get("template", {})
    jpod = jtpl.get("spec", {})
    check((jtpl.get("metadata") or {}).get("annotations", {}).get("sidecar.istio.io/inject") == "false", f"job: Istio injection off by default (an injected Job never completes), got {jtpl.get('metadata')}")
    check(jpod.get("restartPolicy") == "Never", "job: restartPolicy Never")
    check(jpod.get("securityContext") == pod.get("securityContext"), "job: same pod securityContext as the example")
    check(jpod.get("automountServiceAccountToken") is False, "job: no service account token")
    check(not jpod.get("initContainers") and len(jpod.get("containers") or []) == 1, "job: one container, no sidecar")
    migrate = container(jpod, "migrate")
    check(migrate.get("args") == ["migrate", "--config", CONFIG_PATH], f"job: runs migrate --config, got {migrate.get('args')}")
    check(migrate.get("image") == IMAGE, "job: broker image")
    check(migrate.get("securityContext") == SECURITY_CONTEXT, "job: restrictive securityContext (the sidecar's)")
    jenv = [e.get("name") for e in migrate.get("env") or []]
    check(jenv == ["TOKEN_BROKER_DATABASE_URL"], f"job: only the database URL variable (no upstream secret, no encryption key), got {jenv}")
    check(secret_env(migrate).get("TOKEN_BROKER_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef") == {"name": "token-broker-secrets", "key": "database-url-migrator"}, "job: the migrator's database URL key")
    jvols = {v.get("name"): v for v in jpod.get("volumes") or []}
    check(set(jvols) == {"config"}, f"job: only its config volume, got {sorted(jvols)}")
    hook_cm_name = (jvols.get("config") or {}).get("configMap", {}).get("name")
    check(hook_cm_name and hook_cm_name != cm_name, f"job: reads its own ConfigMap, not the regular {cm_name}")
    hook_cm = one(objs, "ConfigMap", "job", lambda o: o.get("metadata", {}).get("name") == hook_cm_name)
    hann = hook_cm.get("metadata", {}).get("annotations", {})
    check(hann.get("helm.sh/hook") == ann.get("helm.sh/hook"), "job: its ConfigMap is a hook of the same events")
    check(int(hann.get("helm.sh/hook-weight", "0")) < int(ann.get("helm.sh/hook-weight", "0")), "job: its ConfigMap has a lower hook-weight (created first)")
    check(hann.get("helm.sh/hook-delete-policy") == "before-hook-creation", f"job: its ConfigMap is kept until the next hook run, got {hann}")
    hook_cfg = parse_toml(hook_cm, "job")
    check(hook_cfg == {"store": {"database_url_env": "TOKEN_BROKER_DATABASE_URL", "query_timeout": "2s", "poll_interval": "30s"}}, f"job: its ConfigMap holds [store] only, with the URL variable and timings, got {hook_cfg}")
    validate_all(CHART, values, "example", mode="native")

    # Variants of the same values.
    section("variants")
    http = objects(render(CHART, merge(values, {"probes": {"type": "http"}, "admin": {"port": 9500}})))
    hdep = one(http, "Deployment", "http probes")
    hside = container(hdep["spec"]["template"]["spec"], "token-broker", init=True)
    check_sidecar(hside, "http probes, admin port 9500", admin_port=9500, probe_type="http")
    hcm = regular_configmap(http, "http probes")
    check(parse_toml(hcm, "port 9500").get("admin", {}).get("listen") == "0.0.0.0:9500", "port 9500: [admin] listen follows admin.port")
    check_annotations(hdep, hcm, "port 9500", port=9500)
    check(pod_annotations(hdep)["checksum/token-broker-config"] != pod_annotations(dep)["checksum/token-broker-config"], "a config change changes the checksum annotation")
    check_api(http, KUBE_VERSIONS[-1], "http probes")

    sock = "unix:/var/run/token-broker/broker.sock"
    for label, over, kube in (("plain mode", {"sidecar": {"mode": "plain"}}, KUBE_VERSIONS[-1]), ("auto on 1.28", {}, OLD_KUBE), ("nativeSidecar: false (deprecated)", {"nativeSidecar": False}, KUBE_VERSIONS[-1])):
        pobjs = objects(render(CHART, merge(values, over), kube))
        ppod = one(pobjs, "Deployment", label)["spec"]["template"]["spec"]
        check(not ppod.get("initContainers"), f"{label}: no init containers")
        check([c.get("name") for c in ppod.get("containers", [])] == ["token-broker", "app"], f"{label}: the sidecar first among containers (its postStart holds the app back), got {[c.get('name') for c in ppod.get('containers', [])]}")
        check_sidecar(container(ppod, "token-broker"), f"{label} sidecar", native=False, addr=sock)
        pcfg = parse_toml(regular_configmap(pobjs, label), label)
        check(pcfg.get("server", {}).get("shutdown_delay") == "5s", f"{label}: [server] shutdown_delay 5s, got {pcfg.get('server')}")
        if kube != OLD_KUBE:
            check_api(pobjs, kube, label)
    validate_all(CHART, merge(values, {"sidecar": {"mode": "plain"}}), "example, plain", mode="plain")
    tuned = objects(render(CHART, merge(values, {"sidecar": {"mode": "plain", "shutdownDelay": "12s", "waitOnStart": {"enabled": False}}})))
    tside = container(one(tuned, "Deployment", "tuned plain")["spec"]["template"]["spec"], "token-broker")
    check_sidecar(tside, "plain without waitOnStart", native=False, wait=False)
    check(parse_toml(regular_configmap(tuned, "tuned"), "tuned").get("server", {}).get("shutdown_delay") == "12s", "sidecar.shutdownDelay is rendered as given")
    zero = objects(render(CHART, merge(values, {"sidecar": {"mode": "plain", "shutdownDelay": "0s"}})))
    check("shutdown_delay" not in parse_toml(regular_configmap(zero, "zero"), "zero").get("server", {}), "shutdownDelay 0s: no shutdown_delay")

    native = objects(render(CHART, merge(values, {"nativeSidecar": True}), OLD_KUBE.replace("28", "30")))
    npod = one(native, "Deployment", "nativeSidecar: true (deprecated)")["spec"]["template"]["spec"]
    check_sidecar(container(npod, "token-broker", init=True), "nativeSidecar: true", native=True)
    check(all(c.get("name") != "token-broker" for c in npod.get("containers", [])), "native sidecar: not also among containers")

    job_more = {"migration": {"imagePullSecrets": [{"name": "regcred"}], "nodeSelector": {"pool": "batch"}, "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}]}}}, "podAnnotations": {"a": "b"}, "podLabels": {"team": "x"}, "extraEnv": [{"name": "PGAPPNAME", "value": "migrate"}], "extraVolumes": [{"name": "db-ca", "secret": {"secretName": "db-ca"}}], "extraVolumeMounts": [{"name": "db-ca", "mountPath": "/etc/db-ca", "readOnly": True}]},
                "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}], "extraVolumes": [{"name": "ca", "configMap": {"name": "ca"}}], "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}]}
    jobj = objects(render(CHART, merge(values, job_more)))
    jp = one(jobj, "Job", "job values")["spec"]["template"]
    jps = jp["spec"]
    check(jps.get("imagePullSecrets") == [{"name": "regcred"}] and jps.get("nodeSelector") == {"pool": "batch"} and jps.get("tolerations") and jps.get("affinity"), f"job: imagePullSecrets, nodeSelector, tolerations, affinity rendered, got {sorted(jps)}")
    check(jp["metadata"].get("annotations") == {"a": "b", "sidecar.istio.io/inject": "false"} and jp["metadata"]["labels"].get("team") == "x", f"job: podAnnotations and podLabels, got {jp['metadata']}")
    jm = container(jps, "migrate")
    check([e["name"] for e in jm.get("env", [])] == ["TOKEN_BROKER_DATABASE_URL", "PGAPPNAME"], f"job: the URL plus migration.extraEnv, not the sidecar's extraEnv, got {jm.get('env')}")
    check({v["name"] for v in jps.get("volumes", [])} == {"config", "db-ca"}, f"job: migration.extraVolumes, not the sidecar's, got {jps.get('volumes')}")
    check_api(jobj, KUBE_VERSIONS[0], "job values")
    own = objects(render(CHART, merge(values, {"migration": {"databaseUrlSecretKey": ""}})))
    oref = secret_env(container(one(own, "Job", "own key")["spec"]["template"]["spec"], "migrate")).get("TOKEN_BROKER_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef")
    check(oref == {"name": "token-broker-secrets", "key": "database-url"}, f"job: without databaseUrlSecretKey, the sidecar's key, got {oref}")

    store_variants(values)

    nomig = objects(render(CHART, merge(values, {"migration": {"enabled": False}})))
    check(not find(nomig, "Job"), "migration.enabled false: no Job")
    check(parse_toml(regular_configmap(nomig, "no migration"), "no migration").get("store", {}).get("migrate") is True, "migration.enabled false: sidecars migrate")

    tcp = objects(render(CHART, merge(values, {"tokenApi": {"socket": {"enabled": False}}})))
    tpod = one(tcp, "Deployment", "tcp")["spec"]["template"]["spec"]
    check("token-broker-socket" not in {v["name"] for v in tpod.get("volumes", [])}, "tcp: no socket volume")
    check({e["name"]: e.get("value") for e in container(tpod, "app").get("env", [])}.get("TOKEN_BROKER_ADDR") == "127.0.0.1:50051", "tcp: app gets the loopback address")

    pm_objs = objects(render(CHART, merge(values, {"admin": {"portName": "broker-admin"}, "metrics": {"podMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s", "labels": {"release": "prom"}}}})))
    pm = one(pm_objs, "PodMonitor", "podMonitor")
    check(pm.get("metadata", {}).get("labels", {}).get("release") == "prom", "podMonitor: extra labels")
    ep = ((pm.get("spec") or {}).get("podMetricsEndpoints") or [{}])[0]
    check(ep == {"port": "broker-admin", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}, f"podMonitor: endpoint on the admin port name, got {ep}")
    check_api(pm_objs, KUBE_VERSIONS[-1], "podMonitor")


def job_parts(objs: list[dict[str, Any]], what: str) -> tuple[dict[str, Any], list[str]]:
    """The migration Job's config (from its hook ConfigMap) and the names of its env entries."""
    job = one(objs, "Job", what)
    jpod = job["spec"]["template"]["spec"]
    cm_name = next((v.get("configMap", {}).get("name") for v in jpod.get("volumes") or [] if v.get("name") == "config"), None)
    cfg = parse_toml(one(objs, "ConfigMap", f"{what} job", lambda o: o["metadata"]["name"] == cm_name), f"{what} job")
    return cfg, [e.get("name") for e in container(jpod, "migrate").get("env") or []]


def store_variants(values: dict[str, Any]) -> None:
    """`store` values are the config's `[store]` fields under their own names, rendered as given."""
    # Every field the config has, set to something other than its default.
    full = {"database_url_env": "TOKEN_BROKER_DATABASE_URL", "listener_url_env": "TOKEN_BROKER_LISTENER_URL", "encryption_key_env": "TOKEN_BROKER_ENCRYPTION_KEY", "pool_size": 3, "migrate": True,
            "connect_timeout": "3s", "startup_timeout": "30s", "query_timeout": "2s", "heartbeat_interval": "4s", "poll_interval": "45s"}
    all_values = merge(values, {"store": full})
    all_values["secrets"]["env"] = all_values["secrets"]["env"] + [{"name": "TOKEN_BROKER_LISTENER_URL", "key": "listener-url"}]
    lint_ok(CHART, all_values, "store, every field")
    objs = objects(render(CHART, all_values))
    cfg = parse_toml(regular_configmap(objs, "store, every field"), "store, every field")
    check(cfg.get("store") == full, f"store, every field: [store] is store without enabled, verbatim, got {cfg.get('store')}")
    check(type(cfg.get("store", {}).get("pool_size")) is int, "store, every field: pool_size stays an integer")
    jcfg, jenv = job_parts(objs, "store, every field")
    timings = {k: v for k, v in full.items() if k.endswith(("_timeout", "_interval"))}
    check(jcfg == {"store": {"database_url_env": "TOKEN_BROKER_DATABASE_URL", **timings}}, f"store, every field: the Job's [store] is the URL and the timings (no listener URL, no key, no pool_size, no migrate), got {jcfg}")
    check(jenv == ["TOKEN_BROKER_DATABASE_URL"], f"store, every field: the Job gets only the database URL, got {jenv}")
    check_api(objs, KUBE_VERSIONS[-1], "store, every field")

    # Only `enabled`: the same [store] as before the rename (URL variable, pool_size 2, migrate
    # false with the Job, no encryption key).
    env = {"secrets": {"existingSecret": "s", "env": [{"name": "TOKEN_BROKER_DATABASE_URL", "key": "u"}]}}
    dobjs = objects(render(CHART, merge(env, {"store": {"enabled": True}})))
    dstore = parse_toml(regular_configmap(dobjs, "store defaults"), "store defaults").get("store")
    check(dstore == {"database_url_env": "TOKEN_BROKER_DATABASE_URL", "pool_size": 2, "migrate": False}, f"store defaults: [store] as before, got {dstore}")
    djcfg, _ = job_parts(dobjs, "store defaults")
    check(djcfg == {"store": {"database_url_env": "TOKEN_BROKER_DATABASE_URL"}}, f"store defaults: the Job's [store], got {djcfg}")

    # The URL from a file: "" unsets the default variable; the Job gets no URL variable.
    by_file = merge(values, {"store": {"database_url_env": "", "database_url_file": "/etc/db/url", "encryption_key_env": "", "encryption_key_file": "/etc/keys/keys"},
                             "migration": {"databaseUrlSecretKey": "", "extraVolumes": [{"name": "db", "secret": {"secretName": "db"}}], "extraVolumeMounts": [{"name": "db", "mountPath": "/etc/db", "readOnly": True}]}})
    lint_ok(CHART, by_file, "store by file")
    fobjs = objects(render(CHART, by_file))
    fstore = parse_toml(regular_configmap(fobjs, "store by file"), "store by file").get("store", {})
    check(fstore.get("database_url_file") == "/etc/db/url" and "database_url_env" not in fstore and fstore.get("encryption_key_file") == "/etc/keys/keys" and "encryption_key_env" not in fstore, f"store by file: file references, empty variables left out, got {fstore}")
    fjcfg, fjenv = job_parts(fobjs, "store by file")
    check(fjcfg == {"store": {"database_url_file": "/etc/db/url", "query_timeout": "2s", "poll_interval": "30s"}}, f"store by file: the Job's [store] names the URL file only, got {fjcfg}")
    check(fjenv == [], f"store by file: the Job gets no URL variable, got {fjenv}")
    check_api(fobjs, KUBE_VERSIONS[-1], "store by file")

    # A field the config gains later needs no template change (the schema lists it, not the
    # templates): shown on a copy without the schema.
    with tempfile.TemporaryDirectory() as tmp:
        nobjs = objects(render(without_schema(tmp), merge(values, {"store": {"future_timeout": "7s"}})))
        check(parse_toml(regular_configmap(nobjs, "future field"), "future field").get("store", {}).get("future_timeout") == "7s", "a new store field is rendered without a template change")
        check(job_parts(nobjs, "future field")[0].get("store", {}).get("future_timeout") == "7s", "a new store field reaches the Job's config too")


def with_charts(parent: Path, tmp: str) -> Path:
    """A copy of a fixture parent chart with helm/token-broker in its charts/."""
    dst = Path(tmp) / parent.name
    shutil.copytree(parent, dst)
    shutil.copytree(CHART, dst / "charts" / "token-broker")
    return dst


def parent() -> None:
    section("parent chart including the sidecar")
    with tempfile.TemporaryDirectory() as tmp:
        shop = with_charts(PARENT, tmp)
        deps = helm.dependency_list(shop)
        check([d.get("status") for d in deps] == ["unpacked"], f"parent: dependency resolved from charts/, got {deps}")
        lint_ok(shop, None, "parent", with_subcharts=True)
        plain_values = {"token-broker": {"sidecar": {"mode": "plain"}}}
        for mode, values, kube in (("native", None, KUBE_VERSIONS[-1]), ("plain", plain_values, KUBE_VERSIONS[-1]), ("plain", None, OLD_KUBE)):
            what = f"parent {mode} (k8s {kube})"
            objs = objects(render(shop, values, kube))
            cm = regular_configmap(objs, what)
            cm_name = cm.get("metadata", {}).get("name")
            if kube == KUBE_VERSIONS[-1]:
                emit(cm, "parent.toml" if mode == "native" else "plain.toml")
            cfg = parse_toml(cm, what)
            check(set(cfg.get("collections", {})) == {"partner-api"}, f"{what}: subchart config from the parent's scoped values, got {cfg.get('collections')}")
            check(cfg.get("server", {}).get("listen") == "unix:/var/run/token-broker/broker.sock", f"{what}: socket from scoped values")
            check(cfg.get("server", {}).get("shutdown_delay") == ("5s" if mode == "plain" else None), f"{what}: shutdown_delay only in plain mode, got {cfg.get('server')}")
            sidecars = {}
            for dep_name, app_name in (("rel-shop", "shop"), ("rel-worker", "worker")):
                dep = one(objs, "Deployment", f"{what} {dep_name}", lambda o, n=dep_name: o["metadata"]["name"] == n)
                pod = dep.get("spec", {}).get("template", {}).get("spec", {})
                side = container(pod, "token-broker", init=mode == "native")
                check_sidecar(side, f"{what} {dep_name} sidecar", native=mode == "native", addr="unix:/var/run/token-broker/broker.sock")
                ref = secret_env(side).get("PARTNER_CLIENT_SECRET", {}).get("valueFrom", {}).get("secretKeyRef")
                check(ref == {"name": "shop-secrets", "key": "partner-client-secret"}, f"{what} {dep_name}: secretKeyRef from the parent's values, got {ref}")
                vols = {v.get("name"): v for v in pod.get("volumes") or []}
                check((vols.get("token-broker-config") or {}).get("configMap", {}).get("name") == cm_name, f"{what} {dep_name}: config volume names the subchart's ConfigMap {cm_name}")
                app = container(pod, app_name)
                check({m["name"]: m["mountPath"] for m in app.get("volumeMounts") or []}.get("token-broker-socket") == "/var/run/token-broker", f"{what} {dep_name}: app mounts the socket dir")
                check_annotations(dep, cm, f"{what} {dep_name}")
                sidecars[dep_name] = side
            shop_side, worker_side = sidecars.get("rel-shop", {}), sidecars.get("rel-worker", {})
            check((worker_side.get("resources") or {}).get("limits", {}).get("memory") == "256Mi", f"{what}: the worker's resources override, got {worker_side.get('resources')}")
            check({e["name"]: e.get("value") for e in worker_side.get("env") or []}.get("RUST_LOG") == "debug", f"{what}: the worker's logLevel override")
            strip = lambda c: {k: v for k, v in c.items() if k not in ("resources", "env")}
            check(strip(shop_side) == strip(worker_side), f"{what}: the .Subcharts and the dict forms give the same sidecar, but for the overrides")
            check(not find(objs, "Deployment", lambda o: o["metadata"]["name"].endswith("-example")), f"{what}: no example Deployment")
            check(bool(find(objs, "CronJob")) == (mode == "native"), f"{what}: the CronJob only in native mode")
            if kube in KUBE_VERSIONS:
                check_api(objs, kube, what)
        validate_all(shop, None, "parent native", mode="native")
        validate_all(shop, plain_values, "parent plain", mode="plain")
        expect_error({"token-broker": {"probes": {"type": "bogus"}}}, ["token-broker", "/probes/type"], "parent: a bad subchart value", path=shop)
        expect_error({"token-broker": {"sidecar": {"mode": "native"}}}, ["sidecar.mode native needs Kubernetes 1.29+", "v1.28.0"], "parent: native mode on Kubernetes 1.28", path=shop, schema=False, kube=OLD_KUBE)

        # The former README's snippet: token-broker.container under containers:. Fine in plain
        # mode; refused in native mode, naming the template to use instead.
        legacy = with_charts(PARENT, tmp + "/legacy")
        for f in ("deployment.yaml", "worker.yaml", "report-cronjob.yaml"):
            (legacy / "templates" / f).unlink()
        (legacy / "templates" / "legacy.yaml").write_text(LEGACY_TEMPLATE)
        lobjs = objects(render(legacy, plain_values))
        check([c.get("name") for c in one(lobjs, "Deployment", "legacy plain")["spec"]["template"]["spec"]["containers"]] == ["shop", "token-broker"], "legacy snippet: still renders in plain mode")
        check_api(lobjs, KUBE_VERSIONS[-1], "legacy snippet, plain")
        expect_error(None, ["sidecar mode is native", 'include \"token-broker.initContainer\" under initContainers:', "restartPolicy: Always is refused"], "legacy snippet in native mode", path=legacy, schema=False)
        expect_error({"token-broker": {"nativeSidecar": True}}, ["sidecar mode is native", "token-broker.initContainer"], "legacy snippet with nativeSidecar: true", path=legacy, schema=False)
        (legacy / "templates" / "legacy.yaml").write_text(LEGACY_TEMPLATE.replace("containers:\n", "initContainers:\n        {{- include \"token-broker.initContainer\" $tb | nindent 8 }}\n      containers:\n", 1).replace("        {{- include \"token-broker.container\" $tb | nindent 8 }}\n", ""))
        expect_error(plain_values, ["sidecar mode is plain", 'include \"token-broker.container\" under containers:'], "initContainer in plain mode", path=legacy, schema=False)
        (legacy / "templates" / "legacy.yaml").write_text(LEGACY_TEMPLATE.replace('$tb := index .Subcharts "token-broker"', '$tb := dict "Values" (index .Values "token-broker") "Release" .Release "Chart" (dict "AppVersion" "0.1.0")'))
        expect_error(None, ["sidecar.mode auto needs .Capabilities"], "a dict context without .Capabilities in auto mode", path=legacy, schema=False)


LEGACY_TEMPLATE = """{{- $tb := index .Subcharts "token-broker" }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  selector:
    matchLabels:
      app: shop
  template:
    metadata:
      labels:
        app: shop
    spec:
      containers:
        - name: shop
          image: busybox:1.36
        {{- include "token-broker.container" $tb | nindent 8 }}
      volumes:
        {{- include "token-broker.volumes" $tb | nindent 8 }}
"""


def two_aliases() -> None:
    section("two aliases of the chart in one parent")
    with tempfile.TemporaryDirectory() as tmp:
        market = with_charts(TWO_ALIASES, tmp)
        lint_ok(market, None, "two aliases", with_subcharts=True)
        for mode, values in (("native", None), ("plain", {"orders-broker": {"sidecar": {"mode": "plain"}}, "reports-broker": {"sidecar": {"mode": "plain"}}})):
            what = f"two aliases, {mode}"
            objs = objects(render(market, values))
            names = {(o["kind"], o["metadata"]["name"]) for o in objs}
            for alias in ("orders-broker", "reports-broker"):
                for kind, name in (("ConfigMap", f"rel-{alias}"), ("ConfigMap", f"rel-{alias}-migrate"), ("Job", f"rel-{alias}-migrate"), ("PodMonitor", f"rel-{alias}")):
                    check((kind, name) in names, f"{what}: {kind} {name} (named after the alias)")
            for app, alias in (("orders", "orders-broker"), ("reports", "reports-broker")):
                dep = one(objs, "Deployment", f"{what} {app}", lambda o, n=f"rel-{app}": o["metadata"]["name"] == n)
                pod = dep["spec"]["template"]["spec"]
                vols = {v["name"]: v for v in pod.get("volumes") or []}
                check(vols.get("token-broker-config", {}).get("configMap", {}).get("name") == f"rel-{alias}", f"{what}: {app} mounts its own broker's ConfigMap rel-{alias}")
                cm = one(objs, "ConfigMap", f"{what} {alias}", lambda o, n=f"rel-{alias}": o["metadata"]["name"] == n)
                check_annotations(dep, cm, f"{what} {app}")
                check(dep["spec"]["template"]["metadata"]["labels"].get("token-broker/sidecar") == f"rel-{alias}", f"{what}: {app}'s pod carries its PodMonitor's label")
                check(sidecar_placements([dep]) == {mode}, f"{what}: {app}'s sidecar is {mode}")
            orders = parse_toml(one(objs, "ConfigMap", "orders", lambda o: o["metadata"]["name"] == "rel-orders-broker"), "orders")
            check(set(orders.get("collections", {})) == {"orders"}, f"{what}: each alias has its own config, got {orders.get('collections')}")
            check(orders.get("store") == {"database_url_env": "TOKEN_BROKER_DATABASE_URL", "pool_size": 4, "poll_interval": "45s", "migrate": False}, f"{what}: the parent's store values under their config names, got {orders.get('store')}")
            reports = parse_toml(one(objs, "ConfigMap", "reports", lambda o: o["metadata"]["name"] == "rel-reports-broker"), "reports")
            check(reports.get("store") == {"database_url_env": "TOKEN_BROKER_DATABASE_URL", "pool_size": 2, "migrate": False}, f"{what}: the other alias keeps the defaults, got {reports.get('store')}")
            jobs = find(objs, "Job")
            for j in jobs:
                jenv = [e["name"] for e in container(j["spec"]["template"]["spec"], "migrate").get("env") or []]
                check(jenv == ["TOKEN_BROKER_DATABASE_URL"], f"{what}: {j['metadata']['name']} gets only the database URL, got {jenv}")
        validate_all(market, None, "two aliases native", mode="native")
        validate_all(market, {"orders-broker": {"sidecar": {"mode": "plain"}}, "reports-broker": {"sidecar": {"mode": "plain"}}}, "two aliases plain", mode="plain")
        same = {"orders-broker": {"fullnameOverride": "tb"}, "reports-broker": {"fullnameOverride": "tb"}}
        clash = objects(render(market, same))
        keys = [(o["kind"], o["metadata"]["name"]) for o in clash]
        check(len(keys) != len(set(keys)), "two aliases with the same fullnameOverride do clash (the uniqueness check sees it)")


# ------------------------------------------------------------------------------------------
# Tree mode: a broker (DaemonSet or Deployment + Service) and follower sidecars.

BROKER = "rel-token-broker-broker"
BROKER_SECRET = "token-broker-broker-tls"
FOLLOWER_SECRET = "token-broker-follower-tls"
BROKER_TLS = {"cert_file": "tls.crt", "key_file": "tls.key", "client_ca_file": "ca.crt"}
FOLLOWER_TLS = {"ca_file": "ca.crt", "cert_file": "tls.crt", "key_file": "tls.key"}


def mounted_file(pod: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str, str, bool] | None:
    """Where a file the container reads comes from: (kind, object name, key, mounted read-only),
    through its volumeMounts and the pod's configMap, secret and projected volumes; None when no
    mounted volume provides that path."""
    vols = {v.get("name"): v for v in pod.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        base = str(m.get("mountPath", "")).rstrip("/") + "/"
        if not path.startswith(base) or m.get("subPath"):
            continue
        rel = path[len(base):]
        v = vols.get(m.get("name")) or {}
        sources = (v.get("projected") or {}).get("sources") or [] if "projected" in v else [{k: v[k]} for k in ("secret", "configMap") if k in v]
        for src in sources:
            for kind in ("secret", "configMap"):
                ref = src.get(kind)
                if not ref:
                    continue
                name = ref.get("secretName") or ref.get("name")
                items = ref.get("items")
                if items is None and "/" not in rel:
                    return (kind, name, rel, m.get("readOnly") is True)
                for it in items or []:
                    if it.get("path") == rel:
                        return (kind, name, it.get("key"), m.get("readOnly") is True)
    return None


def check_files(pod: dict[str, Any], c: dict[str, Any], table: dict[str, Any], want: dict[str, str], secret: str, what: str) -> None:
    """Every TLS path of a config table is a key of `secret`, mounted read-only in the container."""
    for field, key in want.items():
        path = table.get(field)
        got = mounted_file(pod, c, str(path)) if path else None
        check(got == ("secret", secret, key, True), f"{what}: {field} {path!r} is key {key} of Secret {secret}, mounted read-only in {c.get('name')}, got {got}")


def tree_parts(objs: list[dict[str, Any]], what: str, workload: str) -> dict[str, Any]:
    w = one(objs, workload, f"{what} broker", lambda o: o["metadata"]["name"] == BROKER)
    pod = ((w.get("spec") or {}).get("template") or {}).get("spec") or {}
    return {
        "workload": w, "pod": pod, "container": container(pod, "token-broker"),
        "service": one(objs, "Service", f"{what} broker Service"),
        "cm": one(objs, "ConfigMap", f"{what} broker ConfigMap", lambda o: o["metadata"]["name"] == BROKER),
    }


def check_followers(cfg: dict[str, Any], svc: dict[str, Any], pod: dict[str, Any], side: dict[str, Any], files: dict[str, str], secret: str, what: str) -> None:
    """A follower's config: no [store], no [http], every collection a `broker` source whose https
    addresses name the broker Service and its port, with TLS files from `secret`."""
    check("store" not in cfg, f"{what}: a follower has no [store], got {cfg.get('store')}")
    check("http" not in cfg, f"{what}: a follower has no [http] (no upstream), got {cfg.get('http')}")
    cols = cfg.get("collections") or {}
    check(bool(cols), f"{what}: the follower has collections")
    host = f"{(svc.get('metadata') or {}).get('name')}.ns.svc"
    port = ((svc.get("spec") or {}).get("ports") or [{}])[0].get("port")
    for name, col in cols.items():
        src = col.get("source") or {}
        check(src.get("kind") == "broker", f"{what}: collection {name} has kind broker, got {src.get('kind')}")
        check(src.get("collection") == name, f"{what}: collection {name} follows the broker's {name}, got {src.get('collection')}")
        addrs = src.get("addrs") or []
        check(bool(addrs), f"{what}: collection {name} has broker addresses")
        for a in addrs:
            u = urlsplit(a)
            check(u.scheme == "https" and u.hostname == host and u.port == port, f"{what}: {name}'s address {a!r} is https://{host}:{port} (the broker Service and port)")
        check(not (set(col) - {"source", "required", "prefetch"}), f"{what}: {name} keeps only required/prefetch beside its source (no readers, no policy), got {sorted(col)}")
        check(str(src.get("ca_file", "")).startswith("/etc/token-broker/broker-tls/"), f"{what}: {name}'s ca_file under the broker-tls mount, got {src.get('ca_file')}")
        check_files(pod, side, src, files, secret, f"{what} {name}")
        check(set(k for k in src if k.endswith("_file")) == set(files), f"{what}: {name}'s TLS files are {sorted(files)}, got {sorted(k for k in src if k.endswith('_file'))}")
    check(secret_env(side) == {}, f"{what}: the follower sidecar gets no secret variable, got {sorted(secret_env(side))}")


def tree() -> None:
    section("tree mode: broker and followers")
    values = load_values(TREE_VALUES)
    for kind, workload in (("daemonset", "DaemonSet"), ("deployment", "Deployment")):
        what = f"tree {kind}"
        v = merge(values, {"broker": {"kind": kind}})
        lint_ok(CHART, v, what)
        objs = objects(render(CHART, v))
        check(not find(objs, "Secret"), f"{what}: the chart never renders a Secret")
        b = tree_parts(objs, what, workload)
        check(not find(objs, "DaemonSet" if kind == "deployment" else "Deployment", lambda o: o["metadata"]["name"] == BROKER), f"{what}: only a {workload} for the broker")
        bpod, bc, svc, bcm = b["pod"], b["container"], b["service"], b["cm"]
        bcfg = parse_toml(bcm, f"{what} broker")
        side_cm = regular_configmap([o for o in objs if o["metadata"]["name"] != BROKER], f"{what} sidecar")
        fcfg = parse_toml(side_cm, f"{what} follower")
        if kind == "daemonset":
            emit(bcm, "broker.toml")
            emit(side_cm, "follower.toml")

        # The broker: the store, the upstream source and secrets, readers, TLS on the network.
        server = bcfg.get("server") or {}
        check(server.get("listen") == "0.0.0.0:7443", f"{what}: the broker listens on 0.0.0.0:7443, got {server.get('listen')}")
        check("insecure" not in server, f"{what}: no insecure with TLS, got {server}")
        tls = server.get("tls") or {}
        check(tls.get("client_cert") == "required" and tls.get("reload_interval") == "5s", f"{what}: [server.tls] client_cert required, reload_interval 5s, got {tls}")
        check(set(tls) == set(BROKER_TLS) | {"client_cert", "reload_interval"}, f"{what}: [server.tls] fields, got {sorted(tls)}")
        check_files(bpod, bc, tls, BROKER_TLS, BROKER_SECRET, f"{what} broker")
        check(bcfg.get("store") == {"database_url_env": "TOKEN_BROKER_DATABASE_URL", "pool_size": 2, "migrate": False}, f"{what}: the broker holds [store] (migrate false: the Job migrates), got {bcfg.get('store')}")
        bcol = (bcfg.get("collections") or {}).get("partner-api") or {}
        check(bcol.get("readers") == ["spiffe://cluster.local/ns/app/sa/web", "dns:leaf.example", "uid:1000"], f"{what}: readers rendered into [collections.partner-api], got {bcol.get('readers')}")
        check((bcol.get("source") or {}).get("kind") == "oauth2_client_credentials" and bcol.get("policy") == {"refresh_fraction": 0.75}, f"{what}: the broker keeps the upstream source and policy, got {bcol}")
        check(set(secret_env(bc)) == {"PARTNER_CLIENT_SECRET", "TOKEN_BROKER_DATABASE_URL"}, f"{what}: the broker gets the upstream and database secrets, got {sorted(secret_env(bc))}")
        check(bc.get("args") == SERVE_ARGS and bc.get("securityContext") == SECURITY_CONTEXT and bc.get("image") == IMAGE, f"{what}: the broker container: serve, the restrictive securityContext, the image")
        ports = {p.get("name"): p.get("containerPort") for p in bc.get("ports") or []}
        check(ports == {"tb-admin": 9464, "tb-broker": 7443}, f"{what}: broker ports admin 9464 and tb-broker 7443, got {ports}")
        live, ready = bc.get("livenessProbe") or {}, bc.get("readinessProbe") or {}
        check(live.get("grpc") == {"port": 9464, "service": "liveness"} and (ready.get("grpc") or {}).get("port") == 9464, f"{what}: the broker's probes on the admin port, got {live} {ready}")
        check(((bc.get("startupProbe") or {}).get("grpc") or {}) == {"port": 9464, "service": "liveness"}, f"{what}: the broker's startup probe is the liveness check (readiness gates the Service), got {bc.get('startupProbe')}")
        check("restartPolicy" not in bc and "lifecycle" not in bc, f"{what}: the broker is a plain container without the sidecar's postStart wait")
        check(bpod.get("automountServiceAccountToken") is False, f"{what}: no service account token in the broker's pods")
        check_annotations(b["workload"], bcm, f"{what} broker")
        if kind == "deployment":
            check(b["workload"]["spec"].get("replicas") == 2, f"{what}: 2 replicas by default, got {b['workload']['spec'].get('replicas')}")
        else:
            ru = (b["workload"]["spec"].get("updateStrategy") or {}).get("rollingUpdate") or {}
            check(ru == {"maxSurge": 1, "maxUnavailable": 0}, f"{what}: the DaemonSet surges (a node keeps a ready broker), got {ru}")

        # The Service: selects the broker's pods, port by name, node-local for the DaemonSet.
        sspec = svc.get("spec") or {}
        check((svc.get("metadata") or {}).get("name") == BROKER, f"{what}: the Service is {BROKER}, got {(svc.get('metadata') or {}).get('name')}")
        plabels = ((b["workload"]["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        sel = sspec.get("selector") or {}
        check(bool(sel) and all(plabels.get(k) == v for k, v in sel.items()), f"{what}: the Service selects the broker's pods, {sel} vs {plabels}")
        check(sel == b["workload"]["spec"]["selector"]["matchLabels"], f"{what}: the Service's selector is the workload's")
        sport = (sspec.get("ports") or [{}])[0]
        check(sport.get("port") == 7443 and sport.get("targetPort") in ("tb-broker", 7443), f"{what}: the Service serves 7443 to the broker's port, got {sport}")
        itp = "Local" if kind == "daemonset" else "Cluster"
        check(sspec.get("internalTrafficPolicy") == itp, f"{what}: the Service's internalTrafficPolicy is {itp}, got {sspec.get('internalTrafficPolicy')}")

        # The follower sidecar in the example Deployment.
        dep = one(objs, "Deployment", f"{what} example", lambda o: o["metadata"]["name"].endswith("-example"))
        dpod = dep["spec"]["template"]["spec"]
        side = container(dpod, "token-broker", init=True)
        check_sidecar(side, f"{what} follower sidecar")
        check_followers(fcfg, svc, dpod, side, FOLLOWER_TLS, FOLLOWER_SECRET, what)
        check((fcfg.get("collections") or {}).get("partner-api", {}).get("required") is True, f"{what}: the follower keeps required")
        check(set(fcfg.get("collections") or {}) == set(bcfg.get("collections") or {}), f"{what}: the follower follows every broker collection")
        check((fcfg.get("server") or {}).get("listen") == "127.0.0.1:50051", f"{what}: the follower's token API stays on loopback")
        check_annotations(dep, side_cm, f"{what} example")

        # The migration Job runs: the broker holds the store.
        jcfg, jenv = job_parts(objs, what) if find(objs, "Job") else ({}, [])
        check(jcfg == {"store": {"database_url_env": "TOKEN_BROKER_DATABASE_URL"}} and jenv == ["TOKEN_BROKER_DATABASE_URL"], f"{what}: the migration Job for the broker's store, got {jcfg} {jenv}")
        validate_all(CHART, v, what)

    # The broker alone (no followers, no example), clients unauthenticated: no client CA.
    alone = {"broker": {"enabled": True, "kind": "deployment", "tls": {"secretName": BROKER_SECRET, "clientAuth": "none"}, "service": {"internalTrafficPolicy": "Local"}}}
    objs = objects(render(CHART, alone))
    b = tree_parts(objs, "broker alone", "Deployment")
    tls = (parse_toml(b["cm"], "broker alone").get("server") or {}).get("tls") or {}
    check(set(tls) == {"cert_file", "key_file", "reload_interval"}, f"broker alone, clientAuth none: no client_ca_file nor client_cert, got {sorted(tls)}")
    check_files(b["pod"], b["container"], tls, {"cert_file": "tls.crt", "key_file": "tls.key"}, BROKER_SECRET, "broker alone")
    check(mounted_file(b["pod"], b["container"], "/etc/token-broker/tls/ca.crt") is None, "broker alone, clientAuth none: ca.crt not mounted")
    check(b["service"]["spec"].get("internalTrafficPolicy") == "Local", "broker.service.internalTrafficPolicy overrides the default")
    check(not find(objs, "Job"), "broker without store: no migration Job")
    check_api(objs, KUBE_VERSIONS[-1], "broker alone", expect_pods=False)

    # Followers trusting the broker's own Secret (clientAuth optional): only its ca.crt reaches
    # the application's pods, never the broker's key.
    own = merge(alone, {"broker": {"kind": "daemonset", "tls": {"clientAuth": "optional"}, "service": {"internalTrafficPolicy": ""}}, "sidecar": {"follow": {"enabled": True, "tls": {"serverName": "broker.internal"}}}, "example": {"enabled": True}})
    objs = objects(render(CHART, own))
    b = tree_parts(objs, "broker's ca.crt", "DaemonSet")
    dpod = one(objs, "Deployment", "broker's ca.crt example")["spec"]["template"]["spec"]
    side = container(dpod, "token-broker", init=True)
    fcfg = parse_toml(regular_configmap([o for o in objs if o["metadata"]["name"] != BROKER], "broker's ca.crt"), "broker's ca.crt")
    check_followers(fcfg, b["service"], dpod, side, {"ca_file": "ca.crt"}, BROKER_SECRET, "followers with the broker's ca.crt")
    check(fcfg["collections"]["demo"]["source"].get("server_name") == "broker.internal", f"sidecar.follow.tls.serverName is server_name, got {fcfg['collections']['demo']['source']}")
    keys = [it.get("key") for v in dpod.get("volumes") or [] for s in (v.get("projected") or {}).get("sources") or [] for it in (s.get("secret") or {}).get("items") or []]
    check(keys == ["ca.crt"], f"followers with the broker's Secret mount only its ca.crt, got {keys}")
    check_api(objs, KUBE_VERSIONS[-1], "followers with the broker's ca.crt")

    # Followers of a broker in another release: the given addresses, in order; no store, no Job.
    addrs = ["https://tb-broker.shared.svc:7443", "https://tb-regional.shared.svc:7443"]
    far = merge(load_values(EXAMPLE_VALUES), {"store": {"enabled": False}, "sidecar": {"follow": {"enabled": True, "addrs": addrs, "tls": {"secretName": FOLLOWER_SECRET}}}})
    lint_ok(CHART, far, "followers of another release")
    objs = objects(render(CHART, far))
    check(not find(objs, "Job") and not find(objs, "Service") and not find(objs, "DaemonSet"), "followers of another release: no broker, no Job")
    fcfg = parse_toml(regular_configmap(objs, "followers of another release"), "followers of another release")
    check(all(c["source"].get("addrs") == addrs for c in fcfg.get("collections", {}).values()) and set(fcfg.get("collections", {})) == {"partner-api", "report.v2"}, f"followers of another release: each collection tries sidecar.follow.addrs in order, got {fcfg.get('collections')}")
    check("store" not in fcfg and "http" not in fcfg, "followers of another release: no [store], no [http]")
    fside = container(one(objs, "Deployment", "followers of another release")["spec"]["template"]["spec"], "token-broker", init=True)
    check(secret_env(fside) == {}, f"followers of another release: no secret variables, got {sorted(secret_env(fside))}")
    check_api(objs, KUBE_VERSIONS[-1], "followers of another release")

    # Explicitly insecure on both sides: plain TCP, http addresses, no TLS files.
    plain = {"broker": {"enabled": True, "insecure": True}, "sidecar": {"follow": {"enabled": True, "insecure": True}}, "example": {"enabled": True}}
    lint_ok(CHART, plain, "insecure tree")
    objs = objects(render(CHART, plain))
    b = tree_parts(objs, "insecure tree", "DaemonSet")
    server = parse_toml(b["cm"], "insecure broker").get("server") or {}
    check(server.get("insecure") is True and "tls" not in server, f"insecure tree: [server] insecure = true, no [server.tls], got {server}")
    fcfg = parse_toml(regular_configmap([o for o in objs if o["metadata"]["name"] != BROKER], "insecure follower"), "insecure follower")
    src = fcfg["collections"]["demo"]["source"]
    check(src.get("addrs") == [f"http://{BROKER}.ns.svc:7443"] and not any(k.endswith("_file") for k in src), f"insecure tree: http address, no TLS files, got {src}")
    check("projected" not in (b["pod"]["volumes"][0]), "insecure tree: the broker's config volume is the ConfigMap alone")
    check_api(objs, KUBE_VERSIONS[-1], "insecure tree")


def tree_refused() -> None:
    section("tree mode: bad values are refused")
    base = load_values(TREE_VALUES)
    expect_error(merge(base, {"broker": {"kind": "statefulset"}}), ["/broker/kind"], "broker.kind statefulset")
    expect_error({"broker": {"enabled": True}}, ["/broker/tls/secretName"], "a TLS broker without its Secret")
    expect_error({"broker": {"enabled": True, "tls": {"clientAuth": "sometimes"}}}, ["/broker/tls/clientAuth"], "broker.tls.clientAuth not required, optional or none")
    expect_error({"broker": {"enabled": True, "insecure": True, "service": {"internalTrafficPolicy": "Nearby"}}}, ["/broker/service/internalTrafficPolicy"], "a bad internalTrafficPolicy")
    expect_error({"broker": {"enabled": True, "insecure": True, "replicas": -1}}, ["/broker/replicas"], "negative broker.replicas")
    expect_error({"broker": {"enabled": True, "insecure": True, "bogus": 1}}, ["/broker", "bogus"], "an unknown broker key")
    expect_error({"sidecar": {"follow": {"enabled": True, "addrs": ["http://b.ns.svc:7443"]}}}, ["/sidecar/follow/addrs/0"], "an http broker address without sidecar.follow.insecure")
    expect_error({"sidecar": {"follow": {"enabled": True, "addrs": ["b.ns.svc:7443"], "insecure": True}}}, ["/sidecar/follow/addrs/0"], "a broker address without a scheme")
    expect_error({"sidecar": {"follow": {"enabled": True, "tls": {"ca": "x"}}}}, ["/sidecar/follow/tls", "ca"], "an unknown sidecar.follow.tls key")
    expect_error({"config": {"server": {"tls": {"cert_file": "/x"}}}}, ["/config/server"], "config.server.tls (managed by broker.tls)")
    expect_error({"config": {"collections": {"p": {"readers": ["everyone"], "source": {"kind": "demo"}}}}}, ["/config/collections/p/readers/0"], "a reader that is no spiffe://, dns: or uid: identity")
    # Not expressible in the schema (or skipped with it): refused by the templates.
    with tempfile.TemporaryDirectory() as tmp:
        unchecked = without_schema(tmp)
        expect_error({"broker": {"enabled": True}}, ["broker.tls.secretName is empty"], "a TLS broker without its Secret, schema skipped", path=unchecked, schema=False)
        expect_error({"sidecar": {"follow": {"enabled": True, "addrs": ["http://b.ns.svc:7443"], "tls": {"secretName": "s"}}}}, ["is not https", "sidecar.follow.insecure"], "an http broker address, schema skipped", path=unchecked, schema=False)
    expect_error({"sidecar": {"follow": {"enabled": True}}}, ["sidecar.follow.addrs is empty", "broker.enabled"], "a follower with no address and no broker", schema=False)
    expect_error({"sidecar": {"follow": {"enabled": True, "addrs": ["https://b.ns.svc:7443"]}}}, ["sidecar.follow.tls.secretName is empty"], "an https follower without trust", schema=False)
    expect_error(merge(base, {"sidecar": {"follow": {"tls": {"clientCert": False}}}}), ["broker.tls.clientAuth is required", "sidecar.follow.tls.clientCert"], "followers without a client certificate for a broker that requires one", schema=False)
    expect_error(merge(base, {"sidecar": {"follow": {"tls": {"secretName": ""}}}}), ["sidecar.follow.tls.clientCert needs sidecar.follow.tls.secretName", "server key"], "the broker's own Secret as the followers' client certificate", schema=False)
    expect_error(merge(base, {"broker": {"enabled": False}, "sidecar": {"follow": {"addrs": ["https://b.ns.svc:7443"]}}}), ["store.enabled with sidecar.follow.enabled and no broker"], "a store nothing holds", schema=False)
    expect_error({"broker": {"enabled": True, "insecure": True}, "sidecar": {"follow": {"enabled": True}}}, ["is not https", "sidecar.follow.insecure"], "a plain-TCP broker and followers that were not told", schema=False)
    expect_error({"broker": {"enabled": True, "insecure": True, "port": 9464}}, ["broker.port 9464 is the admin port"], "broker.port equal to admin.port", schema=False)


def failures_expected() -> None:
    section("bad values are refused")
    env = {"secrets": {"existingSecret": "s", "env": [{"name": "PARTNER_CLIENT_SECRET", "key": "k"}]}}
    oauth = {"config": {"collections": {"p": {"source": {"kind": "oauth2_client_credentials", "token_url": "https://x.example/t", "client_id": "c", "client_secret_env": "PARTNER_CLIENT_SECRET"}}}}}
    expect_error({"probes": {"type": "bogus"}}, ["/probes/type"], "probes.type bogus")
    expect_error({"admin": {"port": "x"}}, ["/admin/port"], "admin.port a string")
    expect_error({"admin": {"port": 0}}, ["/admin/port"], "admin.port 0")
    expect_error({"admin": {"port": 70000}}, ["/admin/port"], "admin.port 70000")
    expect_error({"admin": {"portName": "a-much-too-long-port-name"}}, ["/admin/portName"], "admin.portName over 15 characters")
    expect_error({"admin": {"portName": "9464"}}, ["/admin/portName"], "admin.portName without a letter")
    expect_error({"store": {"pool_size": -1}}, ["/store/pool_size"], "store.pool_size negative")
    expect_error({"store": {"query_timeout": 5}}, ["/store/query_timeout"], "store.query_timeout not a duration")
    expect_error({"store": {"listener_url_env": "NOT-A-NAME"}}, ["/store/listener_url_env"], "store.listener_url_env not a variable name")
    expect_error({"store": {"conect_timeout": "5s"}}, ["/store", "conect_timeout"], "an unknown store key")
    expect_error({"store": {"enabled": True, "database_url_env": ""}}, ["/store", "database_url_file"], "store enabled without a database URL reference")
    # The chart's old names: refused by the schema with the rename in its message, and by the
    # templates too (for --skip-schema-validation).
    renamed = {"databaseUrlEnv": ("TOKEN_BROKER_DATABASE_URL", "store.databaseUrlEnv was renamed to store.database_url_env"),
               "encryptionKeyEnv": ("TOKEN_BROKER_ENCRYPTION_KEY", "store.encryptionKeyEnv was renamed to store.encryption_key_env"),
               "poolSize": (2, "store.poolSize was renamed to store.pool_size"),
               "extra": ({"query_timeout": "2s"}, "store.extra was removed: put its fields directly under store")}
    with tempfile.TemporaryDirectory() as tmp:
        unchecked = without_schema(tmp)
        for old, (value, message) in renamed.items():
            expect_error({"store": {"enabled": True, old: value}}, [f"/store/{old}", message], f"the old name store.{old}")
            expect_error({"store": {old: value}}, [message], f"the old name store.{old}, schema skipped", path=unchecked, schema=False)
        # The schema's message for an old name is a value it demands; given that value, the
        # templates still refuse it.
        expect_error({"store": {"poolSize": "store.poolSize was renamed to store.pool_size"}}, ["store.poolSize was renamed to store.pool_size"], "an old name set to the schema's message", schema=False)
    expect_error({"secrets": {"existingSecret": "", "env": [{"name": "X", "key": "k"}]}}, ["/secrets/existingSecret"], "secrets.env without existingSecret")
    expect_error({"config": {"server": {"listen": "0.0.0.0:50051"}}}, ["/config/server"], "config.server.listen (managed by tokenApi)")
    expect_error({"config": {"server": {"shutdown_delay": "5s"}}}, ["/config/server"], "config.server.shutdown_delay (managed by sidecar.shutdownDelay)")
    expect_error({"config": {"store": {"pool_size": 2}}}, ["/config"], "config.store (managed by store)")
    expect_error({"config": {"collections": {"p": {"source": {"kind": "oauth2_client_credentials", "client_secret": "not-a-real-secret"}}}}}, ["client_secret"], "an inline client_secret")
    expect_error({"config": {"collections": {"p": {"required": True, "prefetch": False, "source": {"kind": "demo"}}}}}, ["/config/collections/p"], "required without prefetch")
    expect_error({"config": {"collections": {"p": {"source": {"kind": "nope"}}}}}, ["/config/collections/p/source/kind"], "unknown source kind")
    expect_error({"tokenApi": {"listen": "unix:/x.sock"}}, ["/tokenApi/listen"], "tokenApi.listen not IP:PORT")
    expect_error({"unknownKey": 1}, ["unknownKey"], "an unknown top-level value")
    expect_error({"sidecar": {"mode": "sometimes"}}, ["/sidecar/mode"], "sidecar.mode not native, plain or auto")
    expect_error({"sidecar": {"shutdownDelay": "soon"}}, ["/sidecar/shutdownDelay"], "sidecar.shutdownDelay not a duration")
    expect_error({"metrics": {"podMonitor": {"enabled": True, "interval": "often"}}}, ["/metrics/podMonitor/interval"], "podMonitor.interval not a duration")
    expect_error({"migration": {"podAnnotations": {"a": 1}}}, ["/migration/podAnnotations"], "a non-string Job pod annotation")
    # Not expressible in the schema: checked by the templates.
    expect_error(oauth, ["PARTNER_CLIENT_SECRET", "secrets.env"], "a referenced variable no Secret provides", schema=False)
    expect_error(merge(env, {"store": {"enabled": True}}), ["TOKEN_BROKER_DATABASE_URL"], "store without its database URL variable", schema=False)
    expect_error({"nativeSidecar": True, "sidecar": {"mode": "plain"}, "example": {"enabled": True}}, ["nativeSidecar: true (deprecated) contradicts sidecar.mode: plain"], "nativeSidecar true with sidecar.mode plain", schema=False)
    expect_error({"sidecar": {"mode": "native"}, "example": {"enabled": True}}, ["sidecar.mode native needs Kubernetes 1.29+"], "native mode on Kubernetes 1.28", schema=False, kube=OLD_KUBE)
    expect_error({"store": {"enabled": True}, "extraEnv": [{"name": "TOKEN_BROKER_DATABASE_URL", "value": "postgres://h/db"}], "migration": {"databaseUrlSecretKey": "admin-url"}}, ["migration.databaseUrlSecretKey", "secrets.existingSecret"], "databaseUrlSecretKey without existingSecret", schema=False)
    expect_error({"store": {"enabled": True, "database_url_file": "/etc/db/url"}}, ["store.database_url_env and store.database_url_file are both set"], "the database URL as variable and file", schema=False)
    expect_error({"store": {"enabled": True, "database_url_env": "", "database_url_file": "/etc/db/url"}, "secrets": {"existingSecret": "s"}, "migration": {"databaseUrlSecretKey": "admin-url"}}, ["migration.databaseUrlSecretKey", "store.database_url_env"], "databaseUrlSecretKey with the URL from a file", schema=False)
    lint_ok(CHART, merge(env, oauth), "the same variable provided")


def main() -> int:
    helm.disable_logging()
    for step in (defaults, example, parent, two_aliases, tree, tree_refused, failures_expected):
        try:
            step()
        except Exception as e:  # a crash in one group must not hide the others
            check(False, f"{step.__name__}: raised {type(e).__name__}: {e}")
    print(f"{checks} checks, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
