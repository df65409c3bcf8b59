"""Tests for services/common/health_probe.py against a real gRPC health server."""
from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.health_probe import (EXIT_BAD_ARGS, EXIT_CONNECTION_FAILURE, EXIT_RPC_FAILURE,
                                          EXIT_SERVING, EXIT_UNHEALTHY, main, probe)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def server():
    # A thread-pool server: the probe is synchronous and must not share an event loop with it.
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_not_serving_and_unknown_service(server):
    addr, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(addr).exit_code == EXIT_UNHEALTHY
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = probe(addr)
    assert result.exit_code == EXIT_SERVING and "SERVING" in result.message
    servicer.set("inlaid.v1.EngineService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([addr, "--service", "inlaid.v1.EngineService"]) == EXIT_UNHEALTHY
    # The standard servicer answers NOT_FOUND for a service it was never told about.
    assert probe(addr, service="nope").exit_code == EXIT_RPC_FAILURE


def test_nothing_listening_is_a_connection_failure():
    assert probe(f"127.0.0.1:{_free_port()}", timeout_s=0.3).exit_code == EXIT_CONNECTION_FAILURE


@pytest.mark.parametrize("argv", [[], ["localhost"], ["localhost:1", "--timeout", "0"],
                                  ["localhost:1", "--timeout", "x"]])
def test_bad_arguments(argv):
    assert main(argv) == EXIT_BAD_ARGS


def test_runs_as_a_module(server):
    addr, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    proc = subprocess.run([sys.executable, "-m", "services.common.health_probe", addr],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout
