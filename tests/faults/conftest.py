"""Fault-injection fixtures: one FaultCluster (redis-server with AOF, two engines, a gateway, all
real subprocesses on 127.0.0.1) per module, and its no-fault reference outputs."""
from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.cluster import ClusterConfig, FaultCluster

N_IN_FLIGHT = 6
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def cluster():
    cluster = FaultCluster(ClusterConfig())
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(cluster):
    import asyncio

    return asyncio.run(scenarios.reference(cluster, N_IN_FLIGHT, MAX_TOKENS))
