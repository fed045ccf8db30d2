"""Checks of the Helm chart in helm/token-broker, run by tests/it/chart.rs.

Uses helm-python-sdk (Helm's Go SDK, offline): lint (values.schema.json included, and the YAML
of every rendered manifest) and render. Rendered manifests are parsed with the SDK's own YAML
reader, the config file with tomllib. Exits 1 listing every failed check. Prints no secret
values: the values used here hold only names of variables, Secrets and keys.

    python tests/chart/check_chart.py [REPO_ROOT] [--emit-configs DIR]

With --emit-configs, the rendered config.toml of the default values, of ci/example-values.yaml
and of the parent chart are written to DIR (defaults.toml, example.toml, parent.toml) for
`token-broker check-config`.
"""

from __future__ import annotations

import copy
import hashlib
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

import helm_python as helm

ARGS = sys.argv[1:]
EMIT: Path | None = None
if "--emit-configs" in ARGS:
    i = ARGS.index("--emit-configs")
    EMIT = Path(ARGS[i + 1])
    del ARGS[i : i + 2]
ROOT = Path(ARGS[0] if ARGS else Path(__file__).resolve().parents[2])
CHART = ROOT / "helm" / "token-broker"
PARENT = ROOT / "tests" / "chart" / "parent"
EXAMPLE_VALUES = CHART / "ci" / "example-values.yaml"

IMAGE = "ghcr.io/token-broker/token-broker:0.1.0"
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


def render(path: Path, values: dict[str, Any] | None) -> dict[str, str]:
    with helm.Chart.load(path) as chart:
        return chart.render(values=values, name="rel", namespace="ns", is_install=True)


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


def expect_error(values: dict[str, Any], needles: list[str], label: str, path: Path = CHART, schema: bool = True) -> None:
    """Render must raise naming every needle; so must lint for schema errors (lint only logs a
    template's `fail`: Helm's lint mode makes `fail` and `required` lenient)."""
    if schema:
        report = lint(path, values, label, with_subcharts=True)
        lint_text = "\n".join(report["errors"])
        check(bool(report["errors"]), f"{label}: lint reports an error")
        for n in needles:
            check(n in lint_text, f"{label}: lint error names {n!r}, got {lint_text!r}")
    try:
        render(path, values)
        check(False, f"{label}: render fails")
    except helm.HelmError as e:
        for n in needles:
            check(n in str(e), f"{label}: render error names {n!r}, got {str(e)!r}")


def check_sidecar(c: dict[str, Any], what: str, admin_port: int = 9464, probe_type: str = "grpc") -> None:
    check(c.get("image") == IMAGE, f"{what}: image {IMAGE}, got {c.get('image')}")
    check(c.get("args") == SERVE_ARGS, f"{what}: args {SERVE_ARGS}, got {c.get('args')}")
    check(c.get("securityContext") == SECURITY_CONTEXT, f"{what}: restrictive securityContext, got {c.get('securityContext')}")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    check(ports.get("tb-admin") == admin_port, f"{what}: admin container port {admin_port}, got {ports}")
    live, ready, start = c.get("livenessProbe") or {}, c.get("readinessProbe") or {}, c.get("startupProbe") or {}
    if probe_type == "grpc":
        check(live.get("grpc") == {"port": admin_port, "service": "liveness"}, f"{what}: liveness is grpc {admin_port} service liveness, got {live}")
        check(ready.get("grpc", {}).get("port") == admin_port and ready["grpc"].get("service", "") == "", f"{what}: readiness is grpc {admin_port} service '', got {ready}")
        check(start.get("grpc") == {"port": admin_port, "service": "liveness"}, f"{what}: startup probe is the liveness check, got {start}")
        check("httpGet" not in live and "httpGet" not in ready, f"{what}: no http probes with type grpc")
    else:
        check(live.get("httpGet") == {"path": "/livez", "port": admin_port}, f"{what}: liveness GET /livez on {admin_port}, got {live}")
        check(ready.get("httpGet") == {"path": "/readyz", "port": admin_port}, f"{what}: readiness GET /readyz on {admin_port}, got {ready}")
        check("grpc" not in live and "grpc" not in ready, f"{what}: no grpc probes with type http")
    for name, p in (("liveness", live), ("readiness", ready)):
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

def defaults() -> None:
    section("default values")
    lint_ok(CHART, None, "defaults")
    objs = objects(render(CHART, None))
    check(not find(objs, "Job") and not find(objs, "Deployment"), "defaults: no Job and no Deployment (example off, no store)")
    check(not find(objs, "Secret"), "defaults: the chart never renders a Secret")
    cm = regular_configmap(objs, "defaults")
    check(cm.get("metadata", {}).get("name") == "rel-token-broker", f"defaults: ConfigMap named rel-token-broker, got {cm.get('metadata')}")
    emit(cm, "defaults.toml")
    cfg = parse_toml(cm, "defaults")
    check(cfg.get("admin") == {"enabled": True, "listen": "0.0.0.0:9464"}, f"defaults: [admin] listen on 0.0.0.0:9464, got {cfg.get('admin')}")
    check(cfg.get("server", {}).get("listen") == "127.0.0.1:50051", f"defaults: token API on loopback, got {cfg.get('server')}")
    check(cfg.get("collections", {}).get("demo", {}).get("source", {}).get("kind") == "demo", f"defaults: demo collection, got {cfg.get('collections')}")
    check("store" not in cfg, "defaults: no [store]")


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
    check(store.get("query_timeout") == "2s", "example: store.extra merged")
    check_no_inline_secrets(cfg, "example")

    dep = one(objs, "Deployment", "example")
    pod = dep.get("spec", {}).get("template", {}).get("spec", {})
    sidecar = container(pod, "token-broker")
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

    # The migration hook.
    job = one(objs, "Job", "example")
    ann = job.get("metadata", {}).get("annotations", {})
    check(ann.get("helm.sh/hook") == "pre-install,pre-upgrade", f"job: pre-install,pre-upgrade hook, got {ann}")
    check("before-hook-creation" in ann.get("helm.sh/hook-delete-policy", ""), f"job: before-hook-creation delete policy, got {ann}")
    jspec = job.get("spec", {})
    check(isinstance(jspec.get("backoffLimit"), int) and isinstance(jspec.get("activeDeadlineSeconds"), int) and jspec["activeDeadlineSeconds"] > 0, f"job: backoffLimit and activeDeadlineSeconds set, got {jspec}")
    jpod = jspec.get("template", {}).get("spec", {})
    check(jpod.get("restartPolicy") == "Never", "job: restartPolicy Never")
    check(jpod.get("securityContext") == pod.get("securityContext"), "job: same pod securityContext as the example")
    migrate = container(jpod, "migrate")
    check(migrate.get("args") == ["migrate", "--config", CONFIG_PATH], f"job: runs migrate --config, got {migrate.get('args')}")
    check(migrate.get("image") == IMAGE, "job: broker image")
    check(migrate.get("securityContext") == SECURITY_CONTEXT, "job: restrictive securityContext")
    jenv = secret_env(migrate)
    check(jenv.get("TOKEN_BROKER_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef") == {"name": "token-broker-secrets", "key": "database-url-migrator"}, "job: the migrator's database URL key")
    jvols = {v.get("name"): v for v in jpod.get("volumes") or []}
    hook_cm_name = (jvols.get("config") or {}).get("configMap", {}).get("name")
    check(hook_cm_name and hook_cm_name != cm_name, f"job: reads its own ConfigMap, not the regular {cm_name}")
    hook_cm = one(objs, "ConfigMap", "job", lambda o: o.get("metadata", {}).get("name") == hook_cm_name)
    hann = hook_cm.get("metadata", {}).get("annotations", {})
    check(hann.get("helm.sh/hook") == ann.get("helm.sh/hook"), "job: its ConfigMap is a hook of the same events")
    check(int(hann.get("helm.sh/hook-weight", "0")) < int(ann.get("helm.sh/hook-weight", "0")), "job: its ConfigMap has a lower hook-weight (created first)")
    check(hann.get("helm.sh/hook-delete-policy") == "before-hook-creation", f"job: its ConfigMap is kept until the next hook run, got {hann}")
    check(parse_toml(hook_cm, "job") == cfg, "job: hook ConfigMap holds the same config")

    # Variants of the same values.
    section("variants")
    http = objects(render(CHART, merge(values, {"probes": {"type": "http"}, "admin": {"port": 9500}})))
    hdep = one(http, "Deployment", "http probes")
    hside = container(hdep["spec"]["template"]["spec"], "token-broker")
    check_sidecar(hside, "http probes, admin port 9500", admin_port=9500, probe_type="http")
    hcm = regular_configmap(http, "http probes")
    check(parse_toml(hcm, "port 9500").get("admin", {}).get("listen") == "0.0.0.0:9500", "port 9500: [admin] listen follows admin.port")
    check_annotations(hdep, hcm, "port 9500", port=9500)
    check(pod_annotations(hdep)["checksum/token-broker-config"] != pod_annotations(dep)["checksum/token-broker-config"], "a config change changes the checksum annotation")

    native = objects(render(CHART, merge(values, {"nativeSidecar": True})))
    npod = one(native, "Deployment", "native sidecar")["spec"]["template"]["spec"]
    init = container(npod, "token-broker", init=True)
    check(init.get("restartPolicy") == "Always", "native sidecar: init container with restartPolicy Always")
    check(all(c.get("name") != "token-broker" for c in npod.get("containers", [])), "native sidecar: not also among containers")

    nomig = objects(render(CHART, merge(values, {"migration": {"enabled": False}})))
    check(not find(nomig, "Job"), "migration.enabled false: no Job")
    check(parse_toml(regular_configmap(nomig, "no migration"), "no migration").get("store", {}).get("migrate") is True, "migration.enabled false: sidecars migrate")

    tcp = objects(render(CHART, merge(values, {"tokenApi": {"socket": {"enabled": False}}})))
    tpod = one(tcp, "Deployment", "tcp")["spec"]["template"]["spec"]
    check("token-broker-socket" not in {v["name"] for v in tpod.get("volumes", [])}, "tcp: no socket volume")
    check({e["name"]: e.get("value") for e in container(tpod, "app").get("env", [])}.get("TOKEN_BROKER_ADDR") == "127.0.0.1:50051", "tcp: app gets the loopback address")


def parent() -> None:
    section("parent chart including the sidecar")
    with tempfile.TemporaryDirectory() as tmp:
        shop = Path(tmp) / "shop"
        shutil.copytree(PARENT, shop)
        shutil.copytree(CHART, shop / "charts" / "token-broker")
        deps = helm.dependency_list(shop)
        check([d.get("status") for d in deps] == ["unpacked"], f"parent: dependency resolved from charts/, got {deps}")
        lint_ok(shop, None, "parent", with_subcharts=True)
        objs = objects(render(shop, None))
        cm = regular_configmap(objs, "parent")
        cm_name = cm.get("metadata", {}).get("name")
        emit(cm, "parent.toml")
        cfg = parse_toml(cm, "parent")
        check(set(cfg.get("collections", {})) == {"partner-api"}, f"parent: subchart config from the parent's scoped values, got {cfg.get('collections')}")
        check(cfg.get("server", {}).get("listen") == "unix:/var/run/token-broker/broker.sock", "parent: socket from scoped values")
        sidecars = {}
        for dep_name, app_name in (("rel-shop", "shop"), ("rel-worker", "worker")):
            dep = one(objs, "Deployment", f"parent {dep_name}", lambda o, n=dep_name: o["metadata"]["name"] == n)
            pod = dep.get("spec", {}).get("template", {}).get("spec", {})
            side = container(pod, "token-broker")
            check_sidecar(side, f"parent {dep_name} sidecar")
            ref = secret_env(side).get("PARTNER_CLIENT_SECRET", {}).get("valueFrom", {}).get("secretKeyRef")
            check(ref == {"name": "shop-secrets", "key": "partner-client-secret"}, f"parent {dep_name}: secretKeyRef from the parent's values, got {ref}")
            vols = {v.get("name"): v for v in pod.get("volumes") or []}
            check((vols.get("token-broker-config") or {}).get("configMap", {}).get("name") == cm_name, f"parent {dep_name}: config volume names the subchart's ConfigMap {cm_name}")
            app = container(pod, app_name)
            check({m["name"]: m["mountPath"] for m in app.get("volumeMounts") or []}.get("token-broker-socket") == "/var/run/token-broker", f"parent {dep_name}: app mounts the socket dir")
            check_annotations(dep, cm, f"parent {dep_name}")
            sidecars[dep_name] = side
        check(sidecars.get("rel-shop") == sidecars.get("rel-worker"), "parent: the .Subcharts and the dict forms give the same sidecar")
        check(not find(objs, "Deployment", lambda o: o["metadata"]["name"].endswith("-example")), "parent: no example Deployment")
        expect_error({"token-broker": {"probes": {"type": "bogus"}}}, ["token-broker", "/probes/type"], "parent: a bad subchart value", path=shop)


def failures_expected() -> None:
    section("bad values are refused")
    env = {"secrets": {"existingSecret": "s", "env": [{"name": "PARTNER_CLIENT_SECRET", "key": "k"}]}}
    oauth = {"config": {"collections": {"p": {"source": {"kind": "oauth2_client_credentials", "token_url": "https://x.example/t", "client_id": "c", "client_secret_env": "PARTNER_CLIENT_SECRET"}}}}}
    expect_error({"probes": {"type": "bogus"}}, ["/probes/type"], "probes.type bogus")
    expect_error({"admin": {"port": "x"}}, ["/admin/port"], "admin.port a string")
    expect_error({"admin": {"port": 0}}, ["/admin/port"], "admin.port 0")
    expect_error({"admin": {"port": 70000}}, ["/admin/port"], "admin.port 70000")
    expect_error({"store": {"poolSize": -1}}, ["/store/poolSize"], "store.poolSize negative")
    expect_error({"secrets": {"existingSecret": "", "env": [{"name": "X", "key": "k"}]}}, ["/secrets/existingSecret"], "secrets.env without existingSecret")
    expect_error({"config": {"server": {"listen": "0.0.0.0:50051"}}}, ["/config/server"], "config.server.listen (managed by tokenApi)")
    expect_error({"config": {"store": {"pool_size": 2}}}, ["/config"], "config.store (managed by store)")
    expect_error({"config": {"collections": {"p": {"source": {"kind": "oauth2_client_credentials", "client_secret": "not-a-real-secret"}}}}}, ["client_secret"], "an inline client_secret")
    expect_error({"config": {"collections": {"p": {"required": True, "prefetch": False, "source": {"kind": "demo"}}}}}, ["/config/collections/p"], "required without prefetch")
    expect_error({"config": {"collections": {"p": {"source": {"kind": "nope"}}}}}, ["/config/collections/p/source/kind"], "unknown source kind")
    expect_error({"tokenApi": {"listen": "unix:/x.sock"}}, ["/tokenApi/listen"], "tokenApi.listen not IP:PORT")
    expect_error({"unknownKey": 1}, ["unknownKey"], "an unknown top-level value")
    # Not expressible in the schema: checked by the templates.
    expect_error(oauth, ["PARTNER_CLIENT_SECRET", "secrets.env"], "a referenced variable no Secret provides", schema=False)
    expect_error(merge(env, {"store": {"enabled": True}}), ["TOKEN_BROKER_DATABASE_URL"], "store without its database URL variable", schema=False)
    lint_ok(CHART, merge(env, oauth), "the same variable provided")


def main() -> int:
    helm.disable_logging()
    for step in (defaults, example, parent, failures_expected):
        try:
            step()
        except Exception as e:  # a crash in one group must not hide the others
            check(False, f"{step.__name__}: raised {type(e).__name__}: {e}")
    print(f"{checks} checks, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
