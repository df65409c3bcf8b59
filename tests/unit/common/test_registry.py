"""TaskRegistry against a real redis-server: add/remove/update bump the version atomically."""
from __future__ import annotations

import uuid

import pytest

from services.common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.task_registry import TaskRecord, TaskRegistry


@pytest.fixture
async def registry(redis_url):
    client = connect(redis_url)
    yield TaskRegistry(client, RedisKeys(namespace=f"t{uuid.uuid4().hex[:8]}"))
    await client.aclose()


def _record(name: str = "sql", state: str = "READY") -> TaskRecord:
    return TaskRecord(name=name, adapter_path="/a/" + name, rank=8, targets=["q_proj"], state=state)


async def test_add_list_remove_bump_version(registry):
    assert await registry.version() == 0 and await registry.list() == []
    assert await registry.add(_record("b")) == 1
    assert await registry.add(_record("a")) == 2
    assert [t.name for t in await registry.list()] == ["a", "b"]
    assert await registry.get("a") == _record("a")
    assert await registry.remove("a") == 3
    assert await registry.snapshot() == (3, [_record("b")])


async def test_duplicate_missing_and_bad_names(registry):
    await registry.add(_record("a"))
    with pytest.raises(AlreadyExistsError):
        await registry.add(_record("a"))
    with pytest.raises(NotFoundError):
        await registry.remove("nope")
    with pytest.raises(NotFoundError):
        await registry.require("nope")
    for bad in ("", "has space", "x" * 65, "a/b"):
        with pytest.raises(InvalidArgumentError):
            await registry.add(_record(bad))


async def test_update_changes_state_and_servability(registry):
    await registry.add(_record("a"))
    record = await registry.update("a", state="FAILED", message="boom")
    assert not record.is_servable and (await registry.get("a")).message == "boom"
    assert _record("q", state="QUANTIZING").is_servable
    with pytest.raises(ValueError):
        _record("a", state="WEIRD")
