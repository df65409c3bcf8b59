"""Deploy files vs the services' own config: every role variable set is one a service reads, and
the configs built from compose/Kubernetes environments listen where the manifests probe."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import pytest
from k8s_render import render
from test_compose import load

ROOT = Path(__file__).resolve().parents[3]
TARGETS = {"k8s-base": ROOT / "deploy/k8s/base", "k8s-dev": ROOT / "deploy/k8s/overlays/dev",
           "k8s-prod": ROOT / "deploy/k8s/overlays/prod"}
# Config dataclasses whose fields are read as <PREFIX><FIELD> (REDIS_URL is shared).
CONFIGS = {"gateway": [("services.gateway.config", "GatewayConfig")],
           "engine": [("services.engine.config", "EngineConfig"), ("services.engine.worker", "WorkerConfig")],
           "predictor": [("services.predictor.config", "PredictorConfig")],
           # Field names approximate the quantizer's explicit variable table (plus its calib alias).
           "quantizer": [("services.quantizer.config", "QuantizerServiceConfig"),
                         ("services.quantizer.config", "QuantConfig")]}
EXTRA_KNOWN = {"QUANTIZER_NUM_CALIB_SEQS"}
PORTS = {"gateway": 50051, "predictor": 50052, "engine": 50053, "quantizer": 50054}
PREFIXES = ("GATEWAY_", "ENGINE_", "PREDICTOR_", "QUANTIZER_")


def _config_classes(role: str) -> list[type]:
    return [getattr(importlib.import_module(module), name) for module, name in CONFIGS[role]]


def _known(role: str) -> set[str]:
    prefix = role.upper() + "_"
    fields = {prefix + f.name.upper() for cls in _config_classes(role) for f in dataclasses.fields(cls)}
    return fields | EXTRA_KNOWN


def environments() -> dict[str, dict[str, dict[str, str]]]:
    """{source: {role: env}} with Secret references replaced by a stand-in value."""
    services = load("docker-compose.yaml")["services"]
    out = {"compose": {role: {k: str(v) for k, v in svc.get("environment", {}).items()}
                       for role, svc in services.items()}}
    for name, path in TARGETS.items():
        docs = render(path)
        configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        out[name] = {}
        for doc in docs:
            if doc["kind"] != "Deployment":
                continue
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                env.update(configmaps[source["configMapRef"]["name"]])
            for var in container.get("env", []):
                env[var["name"]] = var.get("value", "redis://from-secret:6379/0")
            out[name][doc["metadata"]["name"]] = env
    return out


ENVS = environments()


@pytest.mark.parametrize("source", sorted(ENVS))
def test_every_role_variable_is_read_by_its_service(source):
    for role, env in ENVS[source].items():
        for var in env:
            owner = next((p[:-1].lower() for p in PREFIXES if var.startswith(p)), None)
            if owner is None:
                continue  # shared variables (REDIS_URL, INLAID_*, LOG_*, METRICS_PORT)
            assert var in _known(owner), f"{source}/{role}: {var} is read by no {owner} config"


@pytest.mark.parametrize("source", sorted(ENVS))
def test_configs_built_from_the_deploy_env_listen_where_probed(source):
    envs = ENVS[source]
    from services.engine.config import EngineConfig
    from services.engine.worker import WorkerConfig
    from services.gateway.config import GatewayConfig
    from services.predictor.config import PredictorConfig

    gateway = GatewayConfig.from_env(envs["gateway"])
    assert (gateway.host, gateway.port) == ("0.0.0.0", PORTS["gateway"])
    assert gateway.predictor_addr == f"predictor:{PORTS['predictor']}"
    assert gateway.quantizer_addr == "quantizer:50054"
    assert gateway.redis_url.startswith("redis://")
    worker = WorkerConfig.from_env(envs["engine"])
    assert (worker.host, worker.port) == ("0.0.0.0", PORTS["engine"])
    assert worker.predictor_addr == f"predictor:{PORTS['predictor']}"
    engine = EngineConfig.from_env(envs["engine"])
    assert engine.model == gateway.model
    expected_device = {"compose": "auto", "k8s-dev": "cpu"}.get(source, "cuda")
    assert engine.device == expected_device
    predictor = PredictorConfig.from_env(envs["predictor"])
    assert (predictor.host, predictor.port) == ("0.0.0.0", PORTS["predictor"])
    from services.quantizer.config import QuantizerServiceConfig
    quantizer = QuantizerServiceConfig.from_env(envs["quantizer"])
    assert (quantizer.host, quantizer.port) == ("0.0.0.0", PORTS["quantizer"])
    assert quantizer.model == engine.model  # the base it quantizes is the one served
    # Checkpoints land on the shared data volume the engines mount.
    assert quantizer.checkpoint_dir == "" and envs["quantizer"]["INLAID_CACHE_DIR"].startswith("/data/")


@pytest.mark.parametrize("role", sorted(PORTS))
def test_every_command_module_exists(role):
    """The compose/k8s commands run `python -m services.<role>.server`."""
    assert importlib.util.find_spec(f"services.{role}.server") is not None
