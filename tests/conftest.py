"""Fixtures shared by every suite: one real Redis per test session."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The machine's Redis when REDIS_URL is set, else an embedded redis-server.

    Tests isolate themselves with a unique key namespace, so one server serves them all.
    """
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    # Imported here, not at collection: the GPU suites run on machines without the redis package.
    from services.common.redis_server import EmbeddedRedis
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()
