"""deploy/k8s: kustomize base and overlays render, match the vendored schemas, and hang together."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from k8s_render import RenderError, normalise, render, strategic_merge

from services.common.auth import ApiKeyStore

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
TARGETS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
ROLES = {"gateway": (50051, 9091), "predictor": (50052, 9092), "engine": (50053, 9093),
         "quantizer": (50054, 9094)}
# Secrets the prod overlay expects the operator to create (kubectl create secret ...).
EXTERNAL_SECRETS = {"prod": {"inlaid-redis", "inlaid-api-keys"}}


@functools.lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in TARGETS.items()}


def _by_id(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _container(doc):
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def _env(docs, deployment) -> dict[str, object]:
    """Effective environment of a Deployment's container: envFrom ConfigMaps, then env."""
    by_id = _by_id(docs)
    container = _container(by_id[("Deployment", deployment)])
    env: dict[str, object] = {}
    for source in container.get("envFrom", []):
        env.update(by_id[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_kustomization_uses_only_supported_fields(target):
    validator = _validator("kustomization.json")
    kust = yaml.safe_load((TARGETS[target] / "kustomization.yaml").read_text())
    assert _errors(validator, kust) == []


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_rendered_resource_matches_the_schema(rendered, target):
    validator = _validator("kubernetes.json")
    problems = {f"{d['kind']}/{d['metadata']['name']}": _errors(validator, d) for d in rendered[target]}
    assert {k: v for k, v in problems.items() if v} == {}


def test_schema_rejects_what_kubernetes_rejects(rendered):
    validator = _validator("kubernetes.json")
    gateway = _by_id(rendered["base"])[("Deployment", "gateway")]
    cases = {
        "named grpc probe port": ("readinessProbe", {"grpc": {"port": "grpc"}}),
        "two probe handlers": ("livenessProbe", {"grpc": {"port": 50051}, "tcpSocket": {"port": 50051}}),
        "integer env value": ("env", [{"name": "GATEWAY_PORT", "value": 50051}]),
        "bad quantity": ("resources", {"limits": {"memory": "2 GB"}}),
        "typo": ("readinessProb", {"grpc": {"port": 50051}}),
    }
    for label, (field, value) in cases.items():
        broken = yaml.safe_load(yaml.safe_dump(gateway))
        _container(broken)[field] = value
        assert _errors(validator, broken), label
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
              "data": {"INLAID_AUTH_ENABLED": True}}
    assert _errors(validator, config)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_renderer_agrees_with_kubectl_kustomize(rendered, target):
    out = subprocess.run(["kubectl", "kustomize", str(TARGETS[target])], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    expected = [d for d in yaml.safe_load_all(out) if d]
    assert normalise(rendered[target]) == normalise(expected)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_workloads_probe_grpc_health_on_their_grpc_port(rendered, target):
    for doc in rendered[target]:
        if doc["kind"] != "Deployment":
            continue
        role = doc["metadata"]["name"]
        grpc_port, metrics_port = ROLES[role]
        spec = doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        container = _container(doc)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, (role, probe)
            # Kubernetes' default timeout is 1 s; a busy CPU pod must not flap on that.
            assert container[probe].get("timeoutSeconds", 1) >= 2, (role, probe)
        live = container["livenessProbe"]
        # A restart only after >= 30 s of silence: a long step or GC pause is not death.
        assert live["periodSeconds"] * live["failureThreshold"] >= 30, role
        assert container["command"] == ["python", "-m", f"services.{role}.server"]
        env = _env(rendered[target], role)
        assert env["METRICS_PORT"] == str(metrics_port)
        assert env[f"{role.upper()}_PORT"] == str(grpc_port)
        annotations = spec["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_port)
        security = spec["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_services_select_existing_pods_and_ports(rendered, target):
    docs = rendered[target]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [w for w in workloads
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        names = {p.get("name") for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_peer_addresses_point_at_services(rendered, target):
    docs = rendered[target]
    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
                for d in docs if d["kind"] == "Service"}
    env = _env(docs, "gateway")
    for var in ("GATEWAY_PREDICTOR_ADDR", "GATEWAY_QUANTIZER_ADDR"):
        host, port = env[var].split(":")
        assert int(port) in services[host], var
    host, port = _env(docs, "engine")["ENGINE_PREDICTOR_ADDR"].split(":")
    assert int(port) in services[host]
    for role in ROLES:
        redis = _env(docs, role)["REDIS_URL"]
        if target == "prod":
            assert redis == {"secretKeyRef": {"name": "inlaid-redis", "key": "url"}}
        else:
            assert redis == "redis://redis:6379/0" and 6379 in services["redis"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_gateway_tokenizes_with_the_engine_model(rendered, target):
    assert _env(rendered[target], "gateway")["GATEWAY_MODEL"] == _env(rendered[target], "engine")["ENGINE_MODEL"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_referenced_configmaps_secrets_and_claims_exist(rendered, target):
    docs = rendered[target]
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    external = EXTERNAL_SECRETS.get(target, set())
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in present
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ("Secret", ref["name"]) in present or ref["name"] in external
            volumes = {v["name"] for v in pod.get("volumes", [])} | claims
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert ("Secret", name) in present or name in external
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in present


@pytest.mark.parametrize("target, has_gpu", [("base", True), ("dev", False), ("prod", True)])
def test_engine_gpu_request(rendered, target, has_gpu):
    engine = _container(_by_id(rendered[target])[("Deployment", "engine")])
    limits, requests = engine["resources"]["limits"], engine["resources"]["requests"]
    if has_gpu:
        # Extended resources cannot be overcommitted: an integer, and requests == limits if set.
        assert limits["nvidia.com/gpu"] == 1
        assert requests.get("nvidia.com/gpu", 1) == 1
        assert _env(rendered[target], "engine")["ENGINE_DEVICE"] == "cuda"
    else:
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
        assert _env(rendered[target], "engine")["ENGINE_DEVICE"] == "cpu"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_autoscalers_cover_gateway_and_predictor(rendered, target):
    docs = _by_id(rendered[target])
    hpas = {d["metadata"]["name"]: d for d in rendered[target] if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"gateway", "predictor"}
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", name)
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # Utilization targets are relative to the CPU request: without one the HPA never acts.
        assert "cpu" in _container(docs[("Deployment", name)])["resources"]["requests"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_disruption_budgets_select_gateway_and_engine(rendered, target):
    docs = rendered[target]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    budgets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"gateway", "engine"}
    for name, pdb in budgets.items():
        selected = [n for n, d in deployments.items() if pdb["spec"]["selector"]["matchLabels"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert selected == [name]
        assert pdb["spec"]["maxUnavailable"] == 1  # never blocks a drain, even at one replica


def test_redis_statefulset_persists_with_aof(rendered):
    for target in ("base", "dev"):
        redis = _by_id(rendered[target])[("StatefulSet", "redis")]
        container = _container(redis)
        assert container["args"][:2] == ["--appendonly", "yes"]
        (claim,) = redis["spec"]["volumeClaimTemplates"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
        assert redis["spec"]["serviceName"] == "redis"
    assert not any(d["metadata"]["name"] == "redis" for d in rendered["prod"])


def test_overlay_specifics(rendered):
    base, dev, prod = (_by_id(rendered[t]) for t in ("base", "dev", "prod"))
    assert base[("ConfigMap", "inlaid-config")]["data"]["INLAID_AUTH_ENABLED"] == "true"
    assert dev[("ConfigMap", "inlaid-config")]["data"]["INLAID_AUTH_ENABLED"] == "false"
    assert all(d["spec"].get("replicas", 1) == 1 for (kind, _), d in dev.items() if kind == "Deployment")
    assert dev[("PersistentVolumeClaim", "inlaid-data")]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "REDIS_URL" not in prod[("ConfigMap", "inlaid-config")]["data"]
    assert ("Secret", "inlaid-api-keys") not in prod
    assert prod[("Service", "gateway")]["spec"]["type"] == "LoadBalancer"
    assert prod[("Deployment", "engine")]["spec"]["replicas"] >= 2
    for (kind, _), doc in prod.items():
        if kind == "Deployment":
            assert _container(doc)["image"].startswith("registry.example.com/inlaid/")
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "inlaid"


def test_api_key_secret_is_readable_by_the_gateway(rendered):
    docs = _by_id(rendered["base"])
    secret = docs[("Secret", "inlaid-api-keys")]
    (file_name, text), = secret["stringData"].items()
    assert len(ApiKeyStore.parse(text)) == 1  # the placeholder parses (and matches no known key)
    gateway = _container(docs[("Deployment", "gateway")])
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "api-keys")
    assert _env(rendered["base"], "gateway")["INLAID_API_KEYS_FILE"] == f"{mount['mountPath']}/{file_name}"


@pytest.mark.parametrize("base, patch, expected", [
    ({"a": 1, "b": {"c": 2}}, {"b": {"d": 3}}, {"a": 1, "b": {"c": 2, "d": 3}}),
    ({"a": 1, "b": 2}, {"a": None}, {"b": 2}),
    ({"env": [{"name": "X", "value": "1"}]}, {"env": [{"name": "X", "value": "2"}, {"name": "Y"}]},
     {"env": [{"name": "X", "value": "2"}, {"name": "Y"}]}),
    ({"args": ["a", "b"]}, {"args": ["c"]}, {"args": ["c"]}),
    ({"ports": [{"port": 1, "name": "a"}]}, {"ports": [{"port": 1, "targetPort": 2}]},
     {"ports": [{"port": 1, "name": "a", "targetPort": 2}]}),
])
def test_strategic_merge(base, patch, expected):
    assert strategic_merge(base, patch) == expected


def test_renderer_refuses_missing_targets_and_unknown_fields(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "patch.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n")
    with pytest.raises(RenderError, match="matches 0"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    with pytest.raises(RenderError, match="unsupported"):
        render(tmp_path)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_official_schemas_when_kubernetes_validate_is_installed(rendered, target):
    """Cross-check with the upstream OpenAPI-derived schemas (pip install kubernetes-validate)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in rendered[target]:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
