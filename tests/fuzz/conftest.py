"""Fuzz fixtures: a real gateway subprocess (no engine: a request that passes validation gets
its first message, then the client cancels it) on its own redis-server, with one real task
(adapters/arith) registered, and a pool of hostile adapter directories for AddTask."""
from __future__ import annotations

import random

import pytest

from tests.faults.cluster import FaultCluster
from tests.fuzz.run import base_model_dims, hostile_adapter_dirs, start_fuzz_gateway


@pytest.fixture(scope="module")
def dims():
    return base_model_dims()


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory, dims):
    """(cluster, tasks, hostile adapter dirs); the cluster has Redis and a gateway only."""
    cluster = FaultCluster()
    try:
        tasks = start_fuzz_gateway(cluster)
        dirs = hostile_adapter_dirs(random.Random(1), tmp_path_factory.mktemp("hostile_adapters"),
                                    dims)
        yield cluster, tasks, dirs
    finally:
        cluster.stop()
