"""Deployment files (Dockerfile, deploy/compose.yaml, deploy/k8s, Prometheus, Grafana) checked by parsing:
nothing here needs Docker or a cluster. Metric names are checked against what server/metrics.py actually
exposes, so a renamed metric breaks this test instead of a dashboard panel."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hybridserve.engine.config import EngineStats, StateGroupStats
from hybridserve.engine.gc_pauses import GcSummary
from hybridserve.server.cli import add_serve_command
from hybridserve.server.metrics import ServerMetrics
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DRAIN_MARGIN_S = 5  # beyond the drain: server/runtime.py gives connections 5 s to flush, then the process exits


# ---- helpers -------------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def compose_default(value: str) -> str:
    """'${VAR:-default}' -> 'default' (Compose interpolation with nothing set in the environment)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))


def seconds(duration: str | int) -> float:
    """Compose durations: '45s', '1m30s', '2m'."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def make_targets_needing(target: str, makefile: str) -> set[str]:
    """`target` and every Makefile target whose prerequisites reach it."""
    prereqs = {m.group(1): set(m.group(2).split())
               for m in re.finditer(r"^([a-z][\w-]*):(?!=)([^\n]*)$", makefile, re.MULTILINE)}
    found = {target}
    while grown := {t for t, deps in prereqs.items() if deps & found} - found:
        found |= grown
    return found


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridserve")
    add_serve_command(parser.add_subparsers(dest="command"))
    return parser


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """Parse with the real CLI; argparse's exit on an unknown flag becomes a test failure."""
    try:
        return serve_parser().parse_args(["serve", *argv])
    except SystemExit as e:  # pragma: no cover - the failure path
        pytest.fail(f"`hybridserve serve` rejects {argv}: exit {e.code}")


def entrypoint_argv(env: dict[str, str]) -> list[str]:
    """The image's ENTRYPOINT command line with the environment substituted (it is `sh -c 'exec ...'`)."""
    entry = json.loads(dict(dockerfile_instructions())["ENTRYPOINT"])
    assert entry[:2] == ["sh", "-c"], "ENTRYPOINT is expected to be sh -c 'exec hybridserve serve ...'"
    script = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: env.get(m.group(1), ""), entry[2].replace('"$@"', ""))
    argv = shlex.split(script)
    assert argv[:3] == ["exec", "hybridserve", "serve"], "exec makes the server PID 1, so SIGTERM reaches it"
    return argv[3:]


# ---- what the server exposes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Sample name -> label names, from the real /metrics text of ServerMetrics over a stub engine (the metric
    names do not depend on the values)."""
    known = {"num_running": 1, "num_waiting": 2, "kv_pages_used": 3, "kv_pages_total": 10, "kv_page_bytes": 4096,
             "state_groups": {"gdn": StateGroupStats(used=1, total=4, bytes_per_slot=1 << 20)},
             "weights_bytes": 1 << 30, "num_preemptions": 0, "max_concurrency": 4}
    # Fields added to EngineStats later default to 0 here (counters and gauges are numbers).
    stats = EngineStats(**{f.name: known.get(f.name, 0) for f in dataclasses.fields(EngineStats)
                           if f.name in known or (f.default is dataclasses.MISSING
                                                   and f.default_factory is dataclasses.MISSING)})

    class StubEngine:
        model_name = "m"
        max_model_len = 2048
        device_memory = {"allocated": 1 << 30, "reserved": 2 << 30}     # as on CUDA
        share = None    # one API process

        def stats(self) -> EngineStats:
            return stats

        def gc_summaries(self) -> dict[str, GcSummary]:
            return {"api": GcSummary(), "engine": GcSummary()}

        def cpu_seconds(self) -> dict[str, float]:
            return {"api": 1.0, "engine": 2.0}

        def __getattr__(self, name: str) -> int:  # other engine gauges read at scrape time (num_inflight, ...)
            return 0

    engine = StubEngine()
    text = ServerMetrics(engine).render().decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    assert "hybridserve:num_requests_waiting" in names  # the stub really went through the collector
    return names


METRIC_RE = re.compile(r"hybridserve:[A-Za-z0-9_]+")


# ---- Dockerfile and Makefile ---------------------------------------------------------------------------------


def test_dockerfile_user_health_port_and_install_step():
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server must run as a non-root user"
    assert any(k == "HEALTHCHECK" and "/health" in a for k, a in instructions)
    assert any(k == "EXPOSE" and "8000" in a.split() for k, a in instructions)

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install:", makefile, re.MULTILINE), "the Makefile has an `install` target"
    runs = [args for keyword, args in instructions
            if keyword == "RUN" and re.search(r"(?:^|[;&|]\s*)make(?:\s|$)", args)]
    assert runs == ["make install"], f"the image installs exactly as the README does (`make install`): {runs}"
    readme = ROOT / "README.md"
    if readme.exists():  # the README's setup runs the same recipe: `make install` or a target that needs it
        shown = set(re.findall(r"\bmake ([a-z][\w-]*)", readme.read_text()))
        assert shown & make_targets_needing("install", makefile), \
            f"README.md shows `make {sorted(shown)}`, none of which runs the image's `make install`"


def test_dockerfile_entrypoint_passes_env_to_cli():
    env = dockerfile_env()
    assert env["HYBRIDSERVE_HOST"] == "0.0.0.0" and env["HYBRIDSERVE_PORT"] == "8000"
    assert float(env["HYBRIDSERVE_SHUTDOWN_TIMEOUT"]) == 30
    args = parse_serve(entrypoint_argv(env))
    assert args.model == env["HYBRIDSERVE_MODEL"] and args.host == "0.0.0.0" and args.port == 8000
    assert float(args.shutdown_timeout) == 30


# ---- Compose, Prometheus, Grafana ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def bind_mounts(service: dict) -> dict[str, tuple[Path | None, bool]]:
    """container path -> (host path resolved against deploy/ or None for a named volume, read-only)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            read_only = bool(mode) and "ro" in mode[0].split(",")
            is_path = source.startswith((".", "/", "$"))
        else:
            source, target = volume.get("source", ""), volume["target"]
            read_only = bool(volume.get("read_only"))
            is_path = volume.get("type") == "bind"
        out[target] = ((DEPLOY / compose_default(source)).resolve() if is_path else None, read_only)
    return out


def test_compose_hybridserve_service(compose):
    assert {"hybridserve", "prometheus", "grafana"} <= set(compose["services"])
    svc = compose["services"]["hybridserve"]
    context = (DEPLOY / svc["build"]["context"]).resolve()
    assert context == ROOT and (context / svc["build"].get("dockerfile", "Dockerfile")).is_file()
    assert any(str(p).split(":")[-1].split("/")[0] == "8000" for p in svc["ports"])

    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and "gpu" in d["capabilities"] for d in devices)

    test = svc["healthcheck"]["test"]
    assert "http://127.0.0.1:8000/health" in (test if isinstance(test, str) else " ".join(test))

    mounts = bind_mounts(svc)
    assert "/models" in mounts and mounts["/models"][1], "the model volume is mounted read-only at /models"
    env = svc["environment"]
    assert compose_default(env["HYBRIDSERVE_MODEL"]).startswith("/models/")
    shutdown = float(env.get("HYBRIDSERVE_SHUTDOWN_TIMEOUT", dockerfile_env()["HYBRIDSERVE_SHUTDOWN_TIMEOUT"]))
    assert seconds(svc["stop_grace_period"]) >= shutdown + DRAIN_MARGIN_S
    if "command" in svc:
        parse_serve(svc["command"])


def test_prometheus_scrapes_hybridserve(compose):
    svc = compose["services"]["prometheus"]
    assert svc["image"].startswith("prom/prometheus")
    config_flag = next(c for c in svc["command"] if c.startswith("--config.file="))
    host, _ = bind_mounts(svc)[config_flag.split("=", 1)[1]]
    assert host == DEPLOY / "prometheus" / "prometheus.yml" and host.is_file()
    jobs = load_yaml(host)["scrape_configs"]
    targets = [(job, t) for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]]
    job = next(job for job, t in targets if t == "hybridserve:8000")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert seconds(job["scrape_interval"]) == 5


def test_grafana_provisioning(compose):
    svc = compose["services"]["grafana"]
    assert svc["image"].startswith("grafana/grafana")
    mounts = bind_mounts(svc)
    provisioning, _ = mounts["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"

    datasources = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    prom = next(d for d in datasources if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090" and "9090:9090" in compose["services"]["prometheus"]["ports"]

    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in load_yaml(f)["providers"]]
    assert providers
    for provider in providers:
        host, _ = mounts[provider["options"]["path"]]
        assert host == DEPLOY / "grafana" / "dashboards" and (host / "hybridserve.json").is_file()

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "hybridserve.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        uid = panel["datasource"]["uid"]
        if uid.startswith("${"):
            uid = variables[uid[2:-1]]["current"]["value"]
        assert uid == prom["uid"], f"panel {panel['title']!r} points at an unprovisioned data source"


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "hybridserve.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append((f"${variable['name']}", query["query"]))
    return exprs


def test_dashboard_metrics_exist(exposed):
    exprs = dashboard_exprs()
    assert exprs
    for title, expr in exprs:
        used = METRIC_RE.findall(expr)
        assert used, f"{title!r}: no hybridserve metric in {expr!r}"
        unknown = [m for m in used if m not in exposed]
        assert not unknown, f"{title!r} uses {unknown}, which server/metrics.py does not expose"
        labels = set().union(*(exposed[m] for m in used))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            missing = {g.strip() for g in group.split(",")} - labels
            assert not missing, f"{title!r} groups by {missing}, labels that {used} do not carry"
        if "histogram_quantile" in expr:
            assert all(m.endswith("_bucket") for m in used) and re.search(r"by\s*\([^)]*\ble\b", expr)


def test_dashboard_covers_the_operator_questions():
    """The panels operators need: TTFT/ITL p50+p95, throughput, queue, KV, state slots, memory, preemptions."""
    exprs = [e for _, e in dashboard_exprs()]

    def has(metric: str, *, rate: bool = False, quantiles: tuple[str, ...] = ()) -> bool:
        found = [e for e in exprs if "hybridserve:" + metric in e and (not rate or "rate(" in e)]
        return bool(found) and all(any(f"histogram_quantile({q}," in e for e in found) for q in quantiles)

    assert has("time_to_first_token_seconds_bucket", rate=True, quantiles=("0.5", "0.95"))
    assert has("inter_token_latency_seconds_bucket", rate=True, quantiles=("0.5", "0.95"))
    assert has("generation_tokens_total", rate=True)
    assert has("num_preemptions_total", rate=True)
    assert has("jit_compiles_after_ready_total")
    assert has("gc_pause_seconds_total", rate=True) and has("gc_pause_longest_seconds")
    assert has("event_loop_lag_seconds_bucket", rate=True, quantiles=("0.99",))
    assert any("hybridserve:process_cpu_seconds_total" in e and "by (process)" in e and "rate(" in e for e in exprs)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_pages_used",
                  "kv_pages_total", "state_usage_perc", "memory_bytes"):
        assert has(gauge), gauge
    assert any("hybridserve:state_" in e and "by (group)" in e for e in exprs), "state usage per group"
    assert any("hybridserve:memory_bytes" in e and "by (component)" in e for e in exprs)
    assert any("hybridserve:device_memory_bytes" in e and "by (kind)" in e for e in exprs)


# ---- Kubernetes ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    """kind -> object, for every file kustomization.yaml lists (each must parse and exist)."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects: dict[str, dict] = {}
    for resource in kustomization["resources"]:
        with open(K8S / resource) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                    objects[doc["kind"]] = doc
    listed = {str(r) for r in kustomization["resources"]}
    for path in K8S.glob("*.yaml"):
        doc = load_yaml(path)
        if path.name != "kustomization.yaml" and "kind" in doc:
            assert path.name in listed, f"{path.name} is a Kubernetes object missing from kustomization.yaml"
    return objects


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def resolve_port(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)


def container_env(c: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}


def shutdown_timeout(c: dict) -> float:
    """What the pod runs with: an explicit flag in args wins, then the env, then the image default."""
    env = {**dockerfile_env(), **container_env(c)}
    args = parse_serve(entrypoint_argv(env) + list(c.get("args", [])))
    return float(args.shutdown_timeout)


def prestop_sleep(c: dict) -> float:
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native action (Kubernetes >= 1.30)
        return float(pre_stop["sleep"]["seconds"])
    command = " ".join(pre_stop["exec"]["command"])
    return float(re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", command).group(1))


def test_deployment_gpu_probes_and_drain(k8s):
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])

    port = int(container_env(c).get("HYBRIDSERVE_PORT", dockerfile_env()["HYBRIDSERVE_PORT"]))
    assert port == 8000 and any(p["containerPort"] == port for p in c["ports"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and resolve_port(c, get["port"]) == port, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load + warmup take minutes"

    timeout = shutdown_timeout(c)
    assert timeout == 30
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > timeout, \
        "/health is 503 while draining: liveness must not kill a drain"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= prestop_sleep(c) + timeout + DRAIN_MARGIN_S, "SIGKILL would cut the drain short"
    assert prestop_sleep(c) > 0


def test_deployment_security_model_and_scrape(k8s):
    deployment = k8s["Deployment"]
    template = deployment["spec"]["template"]
    pod, c = template["spec"], container(deployment)
    security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert security["runAsNonRoot"] is True and security.get("runAsUser", 1000) != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["enableServiceLinks"] is False, "Service `hybridserve` would inject HYBRIDSERVE_PORT=tcp://..."

    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    if "PersistentVolumeClaim" in k8s:
        assert claim == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount.get("readOnly") is True
    assert container_env(c)["HYBRIDSERVE_MODEL"].startswith("/models/")

    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == 8000
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_service_targets_container_port(k8s):
    service, deployment = k8s["Service"], k8s["Deployment"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000
    assert resolve_port(container(deployment), port.get("targetPort", port["port"])) == 8000
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def adapter_series(metric: str) -> str:
    """The Prometheus series prometheus-adapter serves as `metric`, by the rules in prometheus-adapter-values."""
    rules = load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    for rule in rules:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"].strip("'\"")).group(0)
        renamed = re.sub(rule["name"]["matches"], re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule["name"]["as"]), series)
        if renamed == metric:
            return series
    pytest.fail(f"no prometheus-adapter rule serves {metric}")


def test_hpa_scales_deployment_on_queue_depth(k8s, exposed):
    hpa, deployment = k8s["HorizontalPodAutoscaler"], k8s["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 8
    names = [m[m["type"].lower()]["metric"]["name"] for m in hpa["spec"]["metrics"]
             if m["type"] in ("Pods", "External")]
    assert names
    for name in names:
        series = adapter_series(name)
        assert series in exposed, f"HPA metric {name} comes from {series}, which the server does not expose"
    assert "hybridserve:num_requests_waiting" in {adapter_series(n) for n in names}
