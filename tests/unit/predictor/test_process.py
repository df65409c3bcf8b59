"""`python -m services.predictor.server` starts, answers, and exits cleanly on SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_process_sigterm(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "PREDICTOR_PORT": str(port), "PREDICTOR_HOST": "127.0.0.1",
           "PREDICTOR_MODEL_DIR": str(tiny_model_dir[0]), "PREDICTOR_GRACE_S": "1",
           "METRICS_PORT": "0", "LOG_FORMAT": "text"}
    proc = subprocess.Popen([sys.executable, "-m", "services.predictor.server"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise AssertionError(f"predictor did not become SERVING: {proc.communicate()[0]}")
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "shutting down (SIGTERM)" in out
