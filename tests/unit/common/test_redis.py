"""EmbeddedRedis, RedisKeys and RequestQueue against a real redis-server."""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest
import redis

from services.common.redis_keys import RedisKeys
from services.common.redis_server import EmbeddedRedis, connect
from services.common.request_queue import OutputChunk, QueuedRequest, RequestQueue


@pytest.fixture
async def queue(redis_url):
    client = connect(redis_url)
    q = RequestQueue(client, RedisKeys(namespace=f"t{uuid.uuid4().hex[:8]}"))
    await q.ensure_group()
    yield q
    await client.aclose()


def _request(rid: str = "r1") -> QueuedRequest:
    return QueuedRequest(request_id=rid, task="t", prompt_token_ids=[1, 2, 3],
                         params={"max_tokens": 4}, predicted_output_tokens=7, arrival_ts=1.5)


def test_embedded_redis_reuses_live_server_and_only_owner_stops(tmp_path):
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    second = EmbeddedRedis(tmp_path)
    assert second.start() == url and not second.is_owner
    second.stop()  # not the owner: the server keeps running
    assert redis.Redis.from_url(url).ping()
    first.stop()
    assert not first.socket_path.exists()


def test_keys_follow_the_documented_schema():
    keys = RedisKeys()
    assert keys.requests == "inlaid:default:requests"
    assert keys.output("abc") == "inlaid:req:abc:out"
    assert keys.cancel("abc") == "inlaid:req:abc:cancel"
    assert keys.tasks_version == "inlaid:tasks:version"
    assert keys.stats("sql") == "inlaid:stats:sql"
    with pytest.raises(ValueError):
        RedisKeys(pool="has space")


def test_chunk_and_request_roundtrip():
    chunk = OutputChunk(offset=3, token_ids=[5, 6], text="ab", finish_reason=2, error="",
                        num_prompt_tokens=9, num_output_tokens=5)
    assert OutputChunk.from_fields(chunk.to_fields()) == chunk
    request = _request()
    assert QueuedRequest.from_json(request.to_json()) == request
    assert request.deadline_ts is None and request.deadline_monotonic() is None
    timed = dataclasses.replace(request, deadline_ts=time.time() + 30.0)
    assert QueuedRequest.from_json(timed.to_json()) == timed
    assert abs(timed.deadline_monotonic() - (time.monotonic() + 30.0)) < 1.0   # on this process's clock


async def test_enqueue_read_publish_ack(queue):
    await queue.enqueue(_request("r1"))
    assert await queue.backlog() == 1
    [delivery] = await queue.read_new("e1", count=10, block_ms=0)
    assert delivery.request == _request("r1")
    await queue.publish([(delivery.entry_id, "r1", OutputChunk(0, [4], "x"))])
    assert await queue.num_pending() == 1  # not acked before the final chunk
    await queue.publish([(delivery.entry_id, "r1", OutputChunk(1, [5], "y", finish_reason=2,
                                                               num_output_tokens=2))])
    assert await queue.num_pending() == 0 and await queue.backlog() == 0
    chunks = [c async for c in queue.follow("r1", block_ms=100)]
    assert [c.token_ids for c in chunks] == [[4], [5]] and chunks[-1].is_final
    assert await queue.written("r1") == ([4, 5], True)
    assert await queue.client.ttl(queue.keys.output("r1")) > 0


async def test_autoclaim_takes_idle_entries_and_touch_keeps_them(queue):
    await queue.enqueue(_request("r1"))
    await queue.enqueue(_request("r2"))
    first = await queue.read_new("dead", count=2, block_ms=0)
    assert len(first) == 2
    await asyncio.sleep(0.15)
    await queue.touch("dead", [first[1].entry_id])  # r2's engine is alive
    claimed = await queue.autoclaim("alive", min_idle_ms=100, count=10)
    assert [d.request.request_id for d in claimed] == ["r1"]


async def test_cancel_only_active_requests(queue):
    assert not await queue.cancel("missing")
    await queue.enqueue(_request("r1"))
    assert await queue.cancel("r1")
    assert await queue.cancelled(["r1", "r2"]) == {"r1"}


async def test_malformed_entry_is_dropped_not_redelivered(queue):
    await queue.client.xadd(queue.keys.requests, {"req": "{not json"})
    assert await queue.read_new("e1", count=10, block_ms=0) == []
    assert await queue.num_pending() == 0


async def test_output_stream_only_grows_at_its_end(queue):
    """A chunk whose offset is not the stream's end (a zombie engine's) is refused."""
    await queue.enqueue(_request("r1"))
    [delivery] = await queue.read_new("e1", count=1, block_ms=0)
    entry = delivery.entry_id
    assert await queue.publish([(entry, "r1", OutputChunk(0, [1, 2], "ab"))]) == [True]
    # The engine that took over wrote [3]; the zombie retries its offset-2 chunk and an old one.
    assert await queue.publish([(entry, "r1", OutputChunk(2, [3], "c")),
                                (entry, "r1", OutputChunk(2, [9], "z")),
                                (entry, "r1", OutputChunk(0, [1, 2], "ab"))]) == [True, False, False]
    final = OutputChunk(3, [], "", finish_reason=2, num_output_tokens=3)
    assert await queue.publish([(entry, "r1", final)]) == [True]
    assert await queue.publish([(entry, "r1", final)]) == [False]  # finished: nothing more
    assert await queue.written("r1") == ([1, 2, 3], True)
    assert await queue.num_pending() == 0


async def test_publish_reloads_the_script_after_a_flush(queue):
    await queue.client.script_flush()
    await queue.enqueue(_request("r1"))
    [delivery] = await queue.read_new("e1", count=1, block_ms=0)
    assert await queue.publish([(delivery.entry_id, "r1", OutputChunk(0, [1], "a"))]) == [True]


async def test_follow_stops_at_the_callers_deadline(queue):
    """No chunk ever comes: follow() returns at the deadline instead of blocking forever."""
    start = time.monotonic()
    chunks = [c async for c in queue.follow("never-written", block_ms=1000,
                                            deadline_s=start + 0.3)]
    elapsed = time.monotonic() - start
    assert chunks == [] and 0.25 <= elapsed < 0.9


async def test_follow_stops_at_a_deadline_only_once_it_has_passed(queue):
    """follow(deadline_s) with under a millisecond left must wait it out, not return early: the gateway
    reports DEADLINE_EXCEEDED only when the deadline has passed, so an early return ended a client's
    stream cleanly with no final chunk (seen once in 20 `inlaid generate --timeout 0.01` calls)."""
    for left_s in (0.0009, 0.0004, 0.02):
        deadline = time.monotonic() + left_s
        assert [c async for c in queue.follow("nobody", block_ms=100, deadline_s=deadline)] == []
        assert time.monotonic() >= deadline
