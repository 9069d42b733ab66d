"""Static checks of the deployment files (no docker engine or cluster here):
docker/compose.yaml against the compose-spec schema, deploy/k8s against the
Kubernetes schemas kubernetes-validate bundles, deploy/envoy/envoy.yaml's
references, and every PromQL expression of the dashboard and alert rules
against the metrics a live ``Metrics()`` registry exports."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from sidecar.config import Settings, env_name, parser
from sidecar.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker" / "compose.yaml"
# compose-spec/compose-spec schema/compose-spec.json (Apache-2.0), see tests/data/README.md
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
K8S_VERSIONS = ("1.27.0", None)  # the oldest with GA grpc probes, and the newest bundled
GRPC, REST, METRICS, TFS_GRPC, TFS_REST = 8600, 8601, 9600, 8500, 8501


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in load_yaml_docs(p)]


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def known_env() -> set[str]:
    return {env_name(f) for f in Settings.__dataclass_fields__}


def known_flags() -> set[str]:
    return {s for a in parser()._actions for s in a.option_strings}


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_the_compose_spec_schema(compose):
    import jsonschema  # here, not at the top: its import compiles a grammar (~1.5 s) in every collecting process

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(compose, schema)
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["restart_policy"] = "always"  # not a service key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_compose_runs_tf_serving_redis_replicas_and_envoy(compose):
    s = compose["services"]
    assert {"tfserving", "redis", "sidecar", "envoy"} <= set(s)
    tfs = s["tfserving"]
    assert tfs["image"].startswith("tensorflow/serving:")
    assert {str(TFS_GRPC), str(TFS_REST)} <= {str(p) for p in tfs["expose"]}
    assert any(v.split(":")[1] == "/models" for v in tfs["volumes"])
    redis = s["redis"]
    assert redis["image"].split(":")[0] == "redis"
    cmd = redis["command"]
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    side = s["sidecar"]
    assert (COMPOSE.parent / side["build"]["context"] / side["build"]["dockerfile"]).resolve().is_file()
    env = side["environment"]
    assert env["HASHGUARD_BACKEND"] == f"tfserving:{TFS_GRPC}"
    assert env["HASHGUARD_SESSION_STORE"] == "redis://redis:6379/0"
    assert "hardened" in env["HASHGUARD_MODE"]
    assert env["HASHGUARD_NOISE_KEY"].startswith("${HASHGUARD_NOISE_KEY:?")  # one key, required, from outside
    assert set(k for k in env if k.startswith("HASHGUARD_")) <= known_env()
    assert "redis" in side["depends_on"] and "tfserving" in side["depends_on"]
    assert "replicas" in side["deploy"]
    assert "ports" not in side, "replicas publish no host port: clients go through Envoy"
    assert {str(GRPC), str(METRICS)} <= {str(p) for p in side["expose"]}
    envoy = s["envoy"]
    assert envoy["image"].startswith("envoyproxy/envoy:")
    mounted = [v.split(":") for v in envoy["volumes"]]
    assert any((COMPOSE.parent / src).resolve() == DEPLOY / "envoy" / "envoy.yaml" for src, *_ in mounted)
    assert {f"{GRPC}:{GRPC}", f"{REST}:{REST}"} <= set(envoy["ports"])


# --------------------------------------------------------------------------- envoy


@pytest.fixture(scope="module")
def envoy() -> dict:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())


def _routes(envoy: dict):
    for lst in envoy["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for vh in f["typed_config"]["route_config"]["virtual_hosts"]:
                    for r in vh["routes"]:
                        yield lst, f, r


def test_envoy_routes_reference_defined_clusters(envoy, compose):
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    routed = {r["route"]["cluster"] for _, _, r in _routes(envoy)}
    assert routed and routed <= set(clusters)
    ports = {lst["address"]["socket_address"]["port_value"] for lst, _, _ in _routes(envoy)}
    assert ports == {GRPC, REST}
    for _, f, _ in _routes(envoy):
        assert f["name"] == "envoy.filters.network.http_connection_manager"
        assert any(h["name"] == "envoy.filters.http.router" for h in f["typed_config"]["http_filters"])
    sidecar_ports = {int(p) for p in compose["services"]["sidecar"]["expose"]}
    for c in clusters.values():
        assert c["lb_policy"] == "ROUND_ROBIN"
        assert c["load_assignment"]["cluster_name"] == c["name"]
        for ep in c["load_assignment"]["endpoints"]:
            for lb in ep["lb_endpoints"]:
                addr = lb["endpoint"]["address"]["socket_address"]
                assert addr["address"] in compose["services"], "endpoints are compose services"
                assert addr["port_value"] in sidecar_ports


def test_envoy_grpc_cluster_speaks_http2_and_checks_grpc_health(envoy):
    grpc_cluster = next(c for c in envoy["static_resources"]["clusters"]
                        if c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                        ["socket_address"]["port_value"] == GRPC)
    opts = grpc_cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    assert any("grpc_health_check" in hc for hc in grpc_cluster["health_checks"])
    # Envoy refuses a gRPC health check on a cluster without HTTP/2
    for c in envoy["static_resources"]["clusters"]:
        if any("grpc_health_check" in hc for hc in c.get("health_checks", [])):
            assert "typed_extension_protocol_options" in c, c["name"]


# --------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version):
    kv = pytest.importorskip("kubernetes_validate")
    version = version or kv.latest_version()
    docs = k8s_docs()
    assert {"Secret", "StatefulSet", "Service", "Deployment", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ConfigMap"} <= {d["kind"] for _, d in docs}
    for _name, doc in docs:
        kv.validate(doc, version, strict=True)
    deployment = copy.deepcopy(by_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["grpc"]["portt"] = GRPC
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, version, strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def _pod():
    (dep,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "hashguard"]
    return dep, dep["spec"]["template"]["spec"]


def test_k8s_pod_is_the_sidecar_pattern():
    dep, pod = _pod()
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"tfserving", "hashguard"}
    assert containers["tfserving"]["image"].startswith("tensorflow/serving:")
    assert {p["containerPort"] for p in containers["tfserving"]["ports"]} == {TFS_GRPC, TFS_REST}
    hg = containers["hashguard"]
    args = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), "") for a in hg["args"])
    assert args["backend"] == f"localhost:{TFS_GRPC}"
    assert args["mode"] == "hardened"
    assert {"--" + k for k in args} <= known_flags()
    envs = {e["name"]: e for e in hg["env"]}
    assert {n for n in envs if n.startswith("HASHGUARD_")} <= known_env()
    assert envs["HASHGUARD_NOISE_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "hashguard-secrets"
    assert {p["containerPort"] for p in hg["ports"]} == {GRPC, REST, METRICS}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert hg[probe]["grpc"]["port"] == GRPC
    # the session store is the Redis Service, and the store URL names its port
    (redis_svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "hashguard-redis"]
    assert args["session-store"] == f"redis://hashguard-redis:{redis_svc['spec']['ports'][0]['port']}/0"
    # the multiprocess metrics directory is on a writable volume
    mounts = {m["mountPath"]: m for m in hg["volumeMounts"]}
    multiproc = envs["PROMETHEUS_MULTIPROC_DIR"]["value"]
    assert any(multiproc == p or multiproc.startswith(p + "/") for p in mounts)
    assert not mounts[next(p for p in mounts if multiproc.startswith(p))].get("readOnly")
    assert int(envs["HASHGUARD_WORKERS"]["value"]) <= float(hg["resources"]["requests"]["cpu"])


def test_k8s_secrets_resources_and_security():
    _, pod = _pod()
    (secret,) = by_kind("Secret")
    keys = set(secret["stringData"])
    for c in pod["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
    for vol in pod["volumes"]:
        if "secret" in vol:
            assert {i["key"] for i in vol["secret"]["items"]} <= keys
    for _, d in k8s_docs():
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        for c in spec["containers"]:
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (cfg,) = by_kind("ConfigMap")
    conf = dict(ln.split(None, 1) for ln in cfg["data"]["redis.conf"].splitlines() if ln.strip())
    assert conf["maxmemory-policy"] == "noeviction" and conf["appendonly"] == "yes"


def test_k8s_service_hpa_and_scrape_annotations():
    dep, pod = _pod()
    (svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "hashguard"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    named = {p["name"]: p["containerPort"] for c in pod["containers"] if c["name"] == "hashguard" for p in c["ports"]}
    assert {p["port"] for p in svc["spec"]["ports"]} == {GRPC, REST, METRICS}
    for p in svc["spec"]["ports"]:
        assert named[p["targetPort"]] == p["port"]
    assert TFS_GRPC not in {p["port"] for p in svc["spec"]["ports"]}, "the model is reachable only through hashguard"
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == METRICS


def test_ports_follow_the_project_conventions():
    defaults = Settings()
    assert defaults.port == GRPC and defaults.metrics_port == METRICS
    if hasattr(defaults, "rest_port"):
        assert defaults.rest_port == REST
    assert set(re.findall(r"\d+", re.search(r"^EXPOSE (.+)$", (ROOT / "docker" / "Dockerfile.sidecar").read_text(), re.M)[1])) >= {str(GRPC), str(METRICS)}


# --------------------------------------------------------------------------- PromQL


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, from a live registry (metrics added later count too)."""
    m = Metrics("paper")
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count", ""), "info": ("_info",)}
    for collector in list(m.registry._collector_to_names):
        labels = set(getattr(collector, "_labelnames", ()))
        for fam in collector.describe() or collector.collect():
            for sfx in suffixes.get(fam.type, ("",)):
                out[fam.name + sfx] = labels | ({"le"} if sfx == "_bucket" else set())
    return out


def _selectors(expr: str):
    promql = pytest.importorskip("promql_parser")
    expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
    found = []

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            found.append(node)

    promql.walk(promql.parse(expr), visit)
    return found


def _alert_rules():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs():
    dash = json.loads((DEPLOY / "grafana" / "hashguard.json").read_text())
    return dash, [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def _check_names(where: str, expr: str, exported: dict[str, set[str]], recorded: set[str]) -> set[str]:
    names = set()
    sels = _selectors(expr)
    assert sels, f"{where}: no metric in {expr!r}"
    for sel in sels:
        assert sel.name in exported or sel.name in recorded, f"{where}: {sel.name} is not exported by the sidecar"
        names.add(sel.name)
        if sel.name in exported:
            for m in sel.matchers.matchers:
                assert m.name in exported[sel.name] | {"instance", "job", "__name__"}, f"{where}: {sel.name} has no label {m.name}"
    return names


def test_exported_metrics_come_from_the_registry():
    exported = exported_metrics()
    assert {"hashguard_requests_total", "hashguard_cache_answers_total", "hashguard_padding_seconds_bucket",
            "hashguard_backend_up"} <= set(exported)
    assert "code" in exported["hashguard_errors_total"]


def test_alert_rules_name_only_exported_metrics():
    exported = exported_metrics()
    rules = _alert_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", r) for r in recorded)
    used = set()
    for r in rules:
        assert ("alert" in r) != ("record" in r)
        used |= _check_names(r.get("alert") or r["record"], r["expr"], exported, recorded)
        if "alert" in r:
            assert r["labels"]["severity"] in {"critical", "warning", "info"}
            assert r["annotations"]["summary"]
            if "for" in r:
                assert re.fullmatch(r"\d+[smh]", r["for"])
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {"HashguardBackendDown", "HashguardErrorRatioHigh", "HashguardCacheAnswerRatioSpike",
            "HashguardSessionStoreReset", "HashguardPaddingSaturated"} <= alerts
    assert recorded <= used, "every recorded rule is used by an alert"


def test_dashboard_queries_name_only_exported_metrics():
    exported = exported_metrics()
    dash, exprs = _dashboard_exprs()
    used = set()
    for title, expr in exprs:
        used |= _check_names(title, expr, exported, set())
    for want in ("hashguard_cache_answers_total", "hashguard_forwards_total", "hashguard_requests_total",
                 "hashguard_errors_total", "hashguard_backend_up", "hashguard_padding_seconds_bucket",
                 "hashguard_response_latency_seconds_bucket", "hashguard_sessions", "hashguard_session_evictions_total"):
        assert want in used, f"the dashboard shows no {want}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in dash["panels"]:
        assert p["datasource"]["uid"].strip("${}") in variables


def test_a_wrong_metric_name_is_caught():
    exported = exported_metrics()
    with pytest.raises(AssertionError):
        _check_names("probe", "rate(hashguard_cache_hits_total[5m])", exported, set())
    with pytest.raises(AssertionError):
        _check_names("probe", 'rate(hashguard_forwards_total{code="x"}[5m])', exported, set())
