"""`inlaid serve` as a user runs it: child processes, health, demo adapters, CLI, clean SIGTERM."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from services.cli import main as cli_main
from services.common.model_source import cache_dir
from services.common.pb.inlaid.v1 import engine_pb2, engine_pb2_grpc
from tests.integration.conftest import ROOT, free_port

pytestmark = pytest.mark.timeout(300)


def _wait_for_line(process: subprocess.Popen, needle: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    found = threading.Event()

    def pump() -> None:
        for line in process.stdout:
            lines.append(line)
            if needle in line:
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found.is_set() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not found.is_set():
        process.kill()
        pytest.fail(f"`inlaid serve` never printed {needle!r}:\n{''.join(lines)[-4000:]}")
    return lines


def test_inlaid_serve_runs_the_stack_and_stops_cleanly(tmp_path, peft_adapters, capsys):
    # A short cache dir keeps the unix socket path legal; the converted model is shared.
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models")
    adapters = tmp_path / "adapters"
    shutil.copytree(peft_adapters["qv"], adapters / "demo")
    ports = {role: free_port() for role in ("gateway", "predictor", "engine", "quantizer")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "ENGINE_"))}
    env.update(INLAID_CACHE_DIR=str(cache), ENGINE_DEVICE="cpu", ENGINE_KV_CACHE_BYTES=str(32 << 20),
               ENGINE_MAX_MODEL_LEN="1024", GATEWAY_MAX_MODEL_LEN="1024", LOG_LEVEL="WARNING",
               METRICS_PORT="off")  # fixed metrics ports could clash with another stack
    env.pop("REDIS_URL", None)  # exercise the embedded Redis
    args = [sys.executable, "-m", "services.cli", "serve", "--adapters", str(adapters),
            "--no-quantizer", *[f"--{r}-port={p}" for r, p in ports.items()]]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        lines = _wait_for_line(process, "inlaid is serving", timeout_s=240)
        assert "tasks registered: demo" in "".join(lines)
        gateway = f"localhost:{ports['gateway']}"
        assert cli_main(["generate", "--gateway", gateway, "--task", "demo", "--prompt",
                         "Say hi", "--max-tokens", "4", "--ignore-eos"]) == 0
        assert capsys.readouterr().out.strip() != ""
        assert cli_main(["tasks", "list", "--gateway", gateway]) == 0
        assert "demo" in capsys.readouterr().out
        assert cli_main(["generate", "--gateway", gateway, "--task", "nope", "--prompt", "x"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert cli_main(["generate", "--gateway", gateway, "--task", "demo", "--prompt", "Say hi",
                         "--max-tokens", "4", "--ignore-eos", "--timeout", "60"]) == 0   # the deadline travels
        assert capsys.readouterr().out.strip() != ""
        assert cli_main(["generate", "--gateway", gateway, "--prompt", "Say hi", "--max-tokens", "200",
                         "--ignore-eos", "--timeout", "0.01"]) == 1
        assert "not finished within --timeout 0.01 s" in capsys.readouterr().err
        with grpc.insecure_channel(f"localhost:{ports['engine']}") as channel:
            status = engine_pb2_grpc.EngineServiceStub(channel).GetStatus(
                engine_pb2.GetStatusRequest(), timeout=10)
        assert list(status.loaded_adapters) == ["demo"] and status.num_generated_tokens >= 4
        engine_pid = int(status.engine_id.split("-")[-2])
        socket_path = cache / ".run" / "redis.sock"
        assert socket_path.exists()
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(60)
    assert returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(engine_pid, 0)
    assert not socket_path.exists()
