"""deploy/compose: the stack matches the vendored compose-spec subset and is health-gated end to end."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "deploy" / "compose"
SCHEMA = json.loads((Path(__file__).parent / "schemas" / "compose-spec.json").read_text())
ROLES = {"gateway": (50051, 9091), "predictor": (50052, 9092), "engine": (50053, 9093),
         "quantizer": (50054, 9094)}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose-style variable substitution over a loaded document (what `docker compose config` does)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if unset else current
        if op in ("?", ":?"):
            if unset:
                raise ValueError(f"required variable {name} is not set: {arg}")
            return current
        return current or ""
    if "$" in value.replace("$$", "") and not _VAR.search(value):
        raise ValueError(f"malformed interpolation in {value!r}")
    return _VAR.sub(sub, value)


def load(name: str, env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load((COMPOSE / name).read_text()), env or {})


def merge(base, override):
    """Compose's merge for the shapes we use: mappings merge recursively, the rest is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def stack() -> dict:
    return load("docker-compose.yaml")


def _errors(doc) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_schema_is_valid_and_files_validate(stack):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert _errors(stack) == []
    gpu = load("docker-compose.gpu.yaml")
    assert _errors(gpu) == []
    merged = merge(stack, gpu)
    assert _errors(merged) == []
    for name, svc in merged["services"].items():
        assert "image" in svc or "build" in svc, name


@pytest.mark.parametrize("path, value", [
    (("services", "engine", "depends_on", "redis", "condition"), "healthy"),
    (("services", "engine", "healthcheck", "interval"), "10 seconds"),
    (("services", "engine", "restart"), "sometimes"),
    (("services", "engine", "enviroment"), {"A": "b"}),
    (("services", "gateway", "ports"), ["50051:50051:1"]),
])
def test_schema_rejects_broken_files(stack, path, value):
    broken = copy.deepcopy(stack)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _errors(broken)


def test_interpolation_defaults_and_overrides():
    raw = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    assert interpolate(raw, {})["services"]["gateway"]["environment"]["INLAID_AUTH_ENABLED"] == "false"
    env = {"INLAID_AUTH_ENABLED": "true", "GATEWAY_HOST_PORT": "6000", "ENGINE_DEVICE": "cpu"}
    stack = interpolate(raw, env)
    assert stack["services"]["gateway"]["ports"] == ["6000:50051"]
    assert stack["services"]["engine"]["environment"]["ENGINE_DEVICE"] == "cpu"
    with pytest.raises(ValueError):
        interpolate("${NEEDED:?set it}", {})
    with pytest.raises(ValueError):
        interpolate("${broken", {})


def test_every_dependency_is_health_gated_and_acyclic(stack):
    services = stack["services"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert spec["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in services[dep], dep
    seen: dict[str, int] = {}

    def visit(name: str) -> None:  # depth-first; 1 = on the stack, 2 = done
        assert seen.get(name) != 1, f"dependency cycle through {name}"
        if seen.get(name) == 2:
            return
        seen[name] = 1
        for dep in services[name].get("depends_on", {}):
            visit(dep)
        seen[name] = 2
    for name in services:
        visit(name)
    assert set(services["gateway"]["depends_on"]) == {"redis", "predictor", "quantizer", "engine"}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_roles_listen_probe_and_export_metrics_on_their_ports(stack, role):
    grpc_port, metrics_port = ROLES[role]
    svc = stack["services"][role]
    env = svc["environment"]
    assert svc["command"] == ["python", "-m", f"services.{role}.server"]
    assert env[f"{role.upper()}_PORT"] == str(grpc_port)
    assert env["METRICS_PORT"] == str(metrics_port)
    assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "services.common.health_probe",
                                          f"localhost:{grpc_port}"]
    published = {p.split(":")[-1] for p in svc.get("ports", [])}
    assert {str(metrics_port)} <= set(svc.get("expose", [])) | published
    assert str(grpc_port) in set(svc.get("expose", [])) | published
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    dockerfile = svc["build"]["dockerfile"]
    assert (COMPOSE / svc["build"]["context"] / dockerfile).is_file()
    assert dockerfile.endswith("Dockerfile.engine" if role == "engine" else "Dockerfile.service")


def test_peer_addresses_resolve_to_services(stack):
    services = stack["services"]
    gateway, engine = services["gateway"]["environment"], services["engine"]["environment"]
    for addr in (gateway["GATEWAY_PREDICTOR_ADDR"], gateway["GATEWAY_QUANTIZER_ADDR"],
                 engine["ENGINE_PREDICTOR_ADDR"]):
        host, port = addr.split(":")
        assert services[host]["environment"][f"{host.upper()}_PORT"] == port


def test_gateway_tokenizes_with_the_engine_model():
    for env in ({}, {"ENGINE_MODEL": "llama-3-8b"}):
        services = load("docker-compose.yaml", env)["services"]
        assert services["gateway"]["environment"]["GATEWAY_MODEL"] == \
            services["engine"]["environment"]["ENGINE_MODEL"]


def test_redis_is_persistent(stack):
    redis = stack["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, target = redis["volumes"][0].split(":")
    assert target == "/data" and volume in stack["volumes"]
    for svc in stack["services"].values():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(".") or source in stack["volumes"], mount


def test_gpu_override_reserves_one_nvidia_gpu(stack):
    merged = merge(stack, load("docker-compose.gpu.yaml"))
    engine = merged["services"]["engine"]
    (device,) = engine["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert engine["environment"]["ENGINE_DEVICE"] == "cuda"
    assert engine["environment"]["ENGINE_MODEL"] == "smollm2-135m"  # the rest survives the merge
    assert "deploy" not in stack["services"]["engine"]  # CPU fallback by default


def test_prometheus_profile_scrapes_every_role(stack):
    prom = stack["services"]["prometheus"]
    assert prom["profiles"] == ["observability"]
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {(sd["names"][0], sd["port"]) for job in config["scrape_configs"]
               for sd in job["dns_sd_configs"]}
    assert targets == {(role, metrics) for role, (_, metrics) in ROLES.items()}


def test_probe_budget_fits_inside_the_healthcheck_timeout(stack):
    """health_probe's --timeout (connect + RPC together) must end before Docker kills it."""
    from services.common.health_probe import DEFAULT_TIMEOUT_S

    for name, svc in stack["services"].items():
        test = svc.get("healthcheck", {}).get("test", [])
        if "services.common.health_probe" not in test:
            continue
        budget_s = float(test[test.index("--timeout") + 1]) if "--timeout" in test else DEFAULT_TIMEOUT_S
        timeout_s = float(svc["healthcheck"]["timeout"].rstrip("s"))
        assert budget_s < timeout_s, name
