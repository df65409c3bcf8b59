"""Fuzz fixtures: a real gateway subprocess (no engine: a request that passes validation gets
its first message, then the client cancels it) on its own redis-server, with one real task
(adapters/arith) registered, and a pool of hostile adapter directories for AddTask."""
from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
import pytest

from services.common.model_source import resolve_model
from services.common.pb.inlaid.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.servicer import base_dims
from tests.faults.cluster import ROOT, FaultCluster
from tests.fuzz import hostile_adapters


@pytest.fixture(scope="module")
def dims():
    return base_dims(json.loads((Path(resolve_model().path) / "config.json").read_text()))


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory, dims):
    """(cluster, tasks, hostile adapter dirs); the cluster has Redis and a gateway only."""
    cluster = FaultCluster()
    try:
        cluster.start_redis()
        cluster.start_gateway()
        with grpc.insecure_channel(cluster.gateway_addr) as channel:
            gateway_pb2_grpc.GatewayServiceStub(channel).AddTask(gateway_pb2.AddTaskRequest(
                name="arith", adapter_path=str(ROOT / "adapters" / "arith")), timeout=60)
        root = tmp_path_factory.mktemp("hostile_adapters")
        rng = random.Random(1)
        dirs = [hostile_adapters.make(rng, root, dims, root / "MARKER", kind)[1]
                for kind in hostile_adapters.KINDS]
        yield cluster, ["arith"], dirs
    finally:
        cluster.stop()
